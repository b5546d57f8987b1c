"""``hellbender evaluate``: eval loss and perplexity of the trained result (or the base model)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from hellbender.commands.trained import load_for_use, trained_source
from hellbender.config.schema import ResolvedConfig
from hellbender.errors import OptionError
from hellbender.files import write_atomically
from hellbender.train.loop import evaluate

logger = logging.getLogger(__name__)

EVAL_RESULTS = "eval_results.json"


def run_evaluate(cfg: ResolvedConfig) -> dict[str, float]:
    """Evaluate the trained result (or the base model) on the evaluation split; writes
    ``output_dir/eval_results.json`` and returns ``eval_loss``, ``eval_ppl`` and ``eval_tokens``."""
    from hellbender.data.prepare import prepare_datasets
    from hellbender.models.attention import use_document_attention

    source = trained_source(cfg)
    logger.info("evaluating %s", source.description)
    model, tokenizer = load_for_use(source)
    data = prepare_datasets(source.cfg, tokenizer)
    if data.eval is None or len(data.eval) == 0:
        raise OptionError("no evaluation set: set val_set_size or test_datasets in the config")
    if source.cfg.per_document_attention:  # as in training: one SDPA call per packed document
        use_document_attention(model)
    metrics = evaluate(model, data.eval, source.cfg, tokenizer.pad_token_id)
    metrics = {**metrics, "trained": float(source.trained)}
    out = Path(cfg.output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"model": source.description, **metrics}, indent=2)
    write_atomically(out / EVAL_RESULTS, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return metrics


