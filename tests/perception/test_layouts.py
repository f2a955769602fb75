"""Output binding by name: the layouts' usual names are matched in any case, but outputs whose
names differ only in case are never folded into one."""

from __future__ import annotations

import pytest

from perception.errors import ModelError
from perception.layouts import DECODERS, TensorInfo


def _bind(*names: str, mapping: dict[str, str] | None = None) -> dict[str, str]:
    """Bind yolov8 outputs (1, 7, 5), one per name, for three classes."""
    return DECODERS["yolov8"].bind([TensorInfo(n, (1, 7, 5)) for n in names], mapping or {}, 3)


def test_the_exact_spelling_wins_over_another_case() -> None:
    """A head ``output0`` beside an auxiliary ``OUTPUT0`` of the same shape: names lowercased
    into one dict used to bind whichever came last, in silence; now in either order."""
    assert _bind("output0", "OUTPUT0") == _bind("OUTPUT0", "output0") == {"predictions": "output0"}


def test_outputs_that_differ_only_in_case_and_none_exactly_are_refused() -> None:
    with pytest.raises(ModelError, match=r"outputs \['Output0', 'OUTPUT0'\] differ only in case, and none is spelt "
                                         r"'output0': map the one that is 'predictions' explicitly"):
        _bind("Output0", "OUTPUT0")
    # One output in another case is still its usual name; a mapping still picks by exact name.
    assert _bind("OUTPUT0") == {"predictions": "OUTPUT0"}
    assert _bind("Output0", "OUTPUT0", mapping={"predictions": "OUTPUT0"}) == {"predictions": "OUTPUT0"}
