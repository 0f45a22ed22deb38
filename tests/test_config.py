import io
import re
import tokenize
from dataclasses import fields
from pathlib import Path

from config import Config

ROOT = Path(__file__).resolve().parents[1]


def code_without_comments_and_strings(path: Path) -> str:
    """The source's names and operators, one space apart: comments, docstrings and strings dropped."""
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    return " ".join(t.string for t in tokens if t.type in (tokenize.NAME, tokenize.OP))


def test_every_config_field_is_read_somewhere():
    """No dead hyperparameters: each field is read from a config object (`cfg.<field>`, or `c.<field>` where
    losses.py names it so) in the code outside config.py, not merely named in a comment or matched by an
    unrelated attribute (`self.scale`, `random.seed`, `args.amp`)."""
    code = "\n".join(code_without_comments_and_strings(p) for p in [*ROOT.glob("*.py"), *ROOT.glob("appendix/*.py")]
                     if p.name != "config.py")
    unread = [f.name for f in fields(Config) if not re.search(rf"\b(?:cfg|c) \. {f.name}\b", code)]
    assert not unread
