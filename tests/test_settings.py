"""Settings from the environment: every Literal setting is checked against its own choices."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from typing import Literal, get_args, get_origin

import pytest

from rag_service import settings as settings_module
from rag_service.settings import Settings, SettingsError, field_type


def _literal_fields() -> list[tuple[str, tuple[str, ...]]]:
    out = []
    for f in dataclasses.fields(Settings):
        declared = getattr(settings_module, str(f.type), None)
        if declared is not None and get_origin(declared) is Literal:
            out.append((f.name, get_args(declared)))
    return out


def test_every_literal_setting_is_known_to_the_parser():
    fields = dict(_literal_fields())
    assert {"adapter_mixing", "backend", "device", "hybrid_fusion"} <= set(fields)
    for name, choices in fields.items():
        field = next(f for f in dataclasses.fields(Settings) if f.name == name)
        assert field_type(field) == (str, choices)


@pytest.mark.parametrize(("name", "choices"), _literal_fields())
def test_a_typo_in_a_literal_setting_is_refused(name, choices):
    with pytest.raises(SettingsError, match=f"RAG_{name.upper()}"):
        Settings.from_env({f"RAG_{name.upper()}": "bogus"})
    with pytest.raises(SettingsError, match=f"RAG_{name.upper()}"):  # also when built in code
        Settings(**{name: "bogus"})
    assert getattr(Settings.from_env({f"RAG_{name.upper()}": choices[0]}), name) == choices[0]


def test_serve_help_offers_the_choices():
    out = subprocess.run(
        [sys.executable, "-m", "rag_service", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--adapter-mixing {rows,switch}" in " ".join(out.split())
