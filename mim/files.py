"""Reading the JSON files a user hands mim (annotations, predictions, run records): every way
such a file can be malformed becomes one :class:`ConfigError` line naming the file. (Text and
YAML: :func:`mim.typed_config.read_text` / :func:`~mim.typed_config.load_yaml`.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mim.errors import ConfigError
from mim.typed_config import read_text


def read_json(path: str | Path, what: str) -> Any:
    """A JSON file's value. Python's parser takes ``NaN``/``Infinity`` and numbers beyond float
    range as nan/inf: the callers check the records they use."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} {path} is not valid JSON: {e.msg} (line {e.lineno}, "
                          f"column {e.colno})") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise ConfigError(f"{what} {path}: {' '.join(str(e).split())[:200]}") from None
    except RecursionError:
        raise ConfigError(f"{what} {path} is nested too deeply to read") from None
