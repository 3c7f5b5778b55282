"""The Python snippets of README.md and docs/*.md run.

Each document's ```python blocks run in order, in one namespace, in a fresh Python process (a snippet may register
a quantizer or change other global state), in a temporary working directory. A document whose snippets read what
one of its commands writes, or use inputs they only describe (``waveforms``, ``images``), gets them from
:data:`PREPARE` first: the files the documented command would have written, and inputs of the documented shapes.
A block whose first line starts with ``# docs-test: skip`` followed by the reason is not run; keep such blocks
rare (:data:`MAX_SKIPPED`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_MARKER = "# docs-test: skip"
MAX_SKIPPED = 2
DOCUMENTS = ("README.md", *sorted(path.relative_to(ROOT).as_posix() for path in (ROOT / "docs").glob("*.md")))
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)

# What a document's snippets read but do not define, run first in the same process and folder. ``TESTS`` stands
# for this folder (where docs_snippet_inputs.py lives).
PREPARE: dict[str, str] = {
    "docs/speech-downstream.md": """
        sys.path.insert(0, TESTS)
        from docs_snippet_inputs import speech_downstream_outputs
        speech_downstream_outputs(".")  # runs/w2v-knn_ce, encoder.pt, HF_DIR, feats/valid as the commands write
        import torch
        mask = torch.ones(2, 16000, dtype=torch.long)  # attention mask of the padded batch (B, samples)
        mask[1, 12000:] = 0
    """,
    "docs/speech.md": """
        import torch
        sys.path.insert(0, TESTS)
        from docs_snippet_inputs import pretrained_run
        pretrained_run(".")  # runs/w2v-knn_ce/checkpoints/step_00010000
        waveforms, lengths = torch.randn(2, 32000), torch.tensor([32000, 24000])
    """,
    "docs/vision.md": """
        import torch
        images, step = torch.randn(2, 3, 256, 256), 1000
    """,
    "docs/fairseq2.md": """
        import torch
        from fairseq2.nn import BatchLayout
        seqs = torch.randn(2, 16000)
        seqs_layout = BatchLayout.of(seqs)
    """,
    "docs/performance.md": """
        import torch
        log_probs = torch.randn(256, 2, 64).log_softmax(-1)  # (N, G, M)
        z, codebook, temperature = torch.randn(256, 2, 16), torch.randn(2, 64, 16), torch.full((2,), 0.1)
    """,
}


def python_blocks(document: str) -> list[tuple[int, str]]:
    """(line number, code) of every ```python block of ``document`` (a path relative to the repository)."""
    text = (ROOT / document).read_text(encoding="utf-8")
    return [(text.count("\n", 0, match.start()) + 2, match.group(1)) for match in FENCE.finditer(text)]


def skip_reason(code: str) -> str | None:
    """The reason after the skip marker on a block's first line, or ``None`` for a block that runs."""
    first = code.lstrip("\n").splitlines()[0] if code.strip() else ""
    if not first.startswith(SKIP_MARKER):
        return None
    reason = first[len(SKIP_MARKER) :].strip(" :-")
    if not reason:
        raise ValueError(f"'{first}': say why the block cannot run here, e.g. '{SKIP_MARKER}: needs a GPU'")
    return reason


def program(document: str) -> str:
    """One script: the document's preparation, then every block that runs, each announced on stderr with its line
    (so a failure names the block)."""
    parts = ["import sys"]
    if document in PREPARE:
        parts.append(textwrap.dedent(PREPARE[document]).replace("TESTS", repr(str(ROOT / "tests"))))
    for line, code in python_blocks(document):
        if skip_reason(code) is None:
            parts.append(f"print('--- {document} line {line}', file=sys.stderr)\n{code}")
    return "\n".join(parts)


def test_documents_have_snippets_and_few_skips():
    blocks = {document: python_blocks(document) for document in DOCUMENTS}
    assert len(blocks["README.md"]) >= 5 and sum(map(len, blocks.values())) >= 10
    skipped = [(document, line) for document in DOCUMENTS for line, code in blocks[document] if skip_reason(code)]
    assert len(skipped) <= MAX_SKIPPED, f"too many snippets skipped: {skipped}"
    assert set(PREPARE) <= set(DOCUMENTS) and set(KNOWN_FAILURES) <= set(DOCUMENTS)
    with pytest.raises(ValueError, match="say why"):
        skip_reason(f"{SKIP_MARKER}\nprint(1)\n")
    assert skip_reason(f"{SKIP_MARKER}: needs a GPU\nprint(1)\n") == "needs a GPU"


# Snippets known to fail: the error they must still raise, and why. Once a snippet is fixed the test fails until
# its entry is removed, so this list only shrinks.
KNOWN_FAILURES: dict[str, tuple[str, str]] = {}


@pytest.mark.parametrize("document", DOCUMENTS)
def test_document_snippets_run(document, tmp_path):
    if not any(skip_reason(code) is None for _, code in python_blocks(document)):
        pytest.skip(f"{document} has no Python snippet to run")
    script = tmp_path / "snippets.py"
    script.write_text(program(document), encoding="utf-8")
    python_path = os.pathsep.join(
        [str(ROOT / "plugin"), str(ROOT / "vision_adapter"), str(ROOT / "recipes"), os.environ.get("PYTHONPATH", "")]
    )
    env = {**os.environ, "PYTHONPATH": python_path, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    announced = [line for line in result.stderr.splitlines() if line.startswith(f"--- {document} line")]
    where = announced[-1][4:] if announced else f"{document} (before its first snippet)"
    if document in KNOWN_FAILURES:
        expected, reason = KNOWN_FAILURES[document]
        assert result.returncode != 0 and expected in result.stderr, (
            f"{document} no longer fails with {expected!r} ({reason}): remove it from KNOWN_FAILURES\n"
            f"{result.stderr[-3000:]}"
        )
        return
    assert result.returncode == 0, f"the snippet at {where} failed:\n{result.stderr[-3000:]}"
