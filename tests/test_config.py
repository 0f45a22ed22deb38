import re
from dataclasses import fields
from pathlib import Path

from config import Config

ROOT = Path(__file__).resolve().parents[1]


def test_every_config_field_is_read_somewhere():
    """No dead hyperparameters: each field is read as `<something>.<field>` outside config.py."""
    sources = "\n".join(p.read_text() for p in ROOT.glob("*.py") if p.name != "config.py")
    unread = [f.name for f in fields(Config) if not re.search(rf"\.{f.name}\b", sources)]
    assert not unread
