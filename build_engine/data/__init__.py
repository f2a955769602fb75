"""Datasets: the road-scene generator, COCO / YOLO readers and writers, recorded drives."""
