"""What the imagen-cascade pyfunc model reads from its input: prompts and negative prompts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def prompts_of(model_input: Any) -> list[str]:
    """A DataFrame with a "prompt" column, a list of strings, or one string -> prompts."""
    import pandas as pd

    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, pd.DataFrame):
        if "prompt" in model_input.columns:
            return [str(p) for p in model_input["prompt"]]
        if model_input.shape[1] == 1:  # a bare list arrives as a one-column frame
            return [str(p) for p in model_input.iloc[:, 0]]
        raise ValueError(
            f"input DataFrame needs a 'prompt' column, got columns {list(model_input.columns)}"
        )
    if isinstance(model_input, pd.Series):
        return [str(p) for p in model_input]
    if isinstance(model_input, Mapping) and "prompt" in model_input:
        value = model_input["prompt"]
        return [value] if isinstance(value, str) else [str(p) for p in value]
    if isinstance(model_input, Sequence):
        return [str(p) for p in model_input]
    raise ValueError(
        f"input must be a DataFrame with a 'prompt' column or a list of strings, "
        f"got {type(model_input).__name__}"
    )


def negatives_of(model_input: Any) -> list[str] | None:
    """The ``negative`` column of an input DataFrame (one negative prompt per row; empty
    cells keep the null text); None without such a column."""
    import pandas as pd

    if not isinstance(model_input, pd.DataFrame) or "negative" not in model_input.columns:
        return None
    return ["" if not isinstance(c, str) else c for c in model_input["negative"]]
