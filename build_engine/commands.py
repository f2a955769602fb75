"""The build stage's sub-commands of ``perception`` (registered through the
``perception.commands`` entry point; each module is imported only when its command runs)."""

from perception.cli import Command

COMMANDS = (
    Command("gen-data", "build_engine.datagen_cli", "generate a labelled road-scene dataset or a recorded drive", 10),
    Command("lint-labels", "build_engine.lint_cli", "find geometric and model-assisted label mistakes", 11),
    Command("train", "build_engine.train_cli", "train a detector from a config file", 12),
    Command("eval", "build_engine.eval_cli", "score detections against COCO ground truth (P, R, PR curve, mAP)", 13),
    Command("profile", "build_engine.profile_cli", "count MACs and params per layer", 14),
    Command("prune", "build_engine.prune_cli", "structured channel / block pruning with fine-tuning", 15),
    Command("build", "build_engine.build_cli",
            "fold BN, export ONNX, quantize, build engines, gate, write the manifest", 16),
    Command("import", "build_engine.import_cli",
            "make a servable, gated artifact of an ONNX detector trained elsewhere", 17),
    Command("design", "build_engine.design_cli",
            "the design table: families, activations, scaling; MACs, latency, mAP side by side", 19),
    Command("sign", "build_engine.sign_cli", "sign an artifact's manifest (Ed25519) for devices that check it", 18),
)
