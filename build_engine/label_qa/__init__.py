"""Label QA: geometric defects and model-assisted labelling mistakes, as a ranked list."""

from build_engine.label_qa.issues import Issue, find_geometric_issues
from build_engine.label_qa.model_assisted import find_model_issues
from build_engine.label_qa.records import LabelRecord, LabelSet, read_label_set

__all__ = ["LabelRecord", "LabelSet", "read_label_set", "Issue", "find_geometric_issues", "find_model_issues"]
