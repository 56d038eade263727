"""Fixtures shared by several test files."""

from __future__ import annotations

import os

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The workers share the cores (pytest -n auto): one torch thread each, inherited by the runs they
    # start, as two 2-thread processes on 2 cores run several times slower than two 1-thread ones.
    os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(scope="session")
def hf_tok_dir(tmp_path_factory):
    """A tiny WordLevel tokenizer trained here, saved as tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    sentences = ["the cat sat on the mat", "a dog ate the bone", "cats and dogs sat", "one two three four"]
    tok.train_from_iterator(sentences, trainers.WordLevelTrainer(special_tokens=["[UNK]", "</s>"]))
    # Like T5: encode() appends </s>; the corpus must not (it puts eos *between* documents).
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    d = tmp_path_factory.mktemp("tok")
    tok.save(str(d / "tokenizer.json"))
    return d
