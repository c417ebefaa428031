"""lm-evaluation-harness adapter: the ensemble as the lm-eval model ``downscale-ensemble``.

Students are plain Hugging Face folders, so lm-eval runs them as they are::

    lm_eval --model hf --model_args pretrained=runs/demo/specialized/0 --tasks hellaswag

The ensemble needs this module imported (which registers it); ``python -m downscale.harness``
does that and then runs lm-eval's own command line::

    python -m downscale.harness --model downscale-ensemble \\
        --model_args path=runs/demo/ensemble,mode=routed,device=cuda --tasks hellaswag

or from Python: ``import downscale.harness`` then ``lm_eval.simple_evaluate(model="downscale-ensemble",
model_args="path=...,mode=...", tasks=[...])``, or ``EnsembleLM(ensemble=<EnsembleModel>)``.
Model args: ``path`` (the ensemble folder), ``mode`` (default: the saved default), ``device``,
``dtype`` (float32 | bfloat16 | float16), ``batch_size``, ``max_length`` (default: the students'
max_position_embeddings, at most 4096), ``max_gen_toks`` (default 256).

lm-eval is an optional extra (``pip install 'downscale[lm-eval]'``); without it this module
imports fine and ``HAVE_LM_EVAL`` is False.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from downscale import progress

try:
    from lm_eval import utils as _lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model

    HAVE_LM_EVAL = True
except ImportError:  # the optional extra is not installed
    HAVE_LM_EVAL = False


if HAVE_LM_EVAL:

    @register_model("downscale-ensemble")
    class EnsembleLM(TemplateLM):
        """An EnsembleModel behind lm-eval's interface (loglikelihood, loglikelihood_rolling,
        generate_until). Every score comes from the ensemble's combined next-token distribution."""

        def __init__(self, path: str | None = None, mode: str | None = None, device: str = "cpu",
                     dtype: str = "float32", batch_size: int | str = 1, max_length: int | None = None,
                     max_gen_toks: int = 256, ensemble: Any = None, **_: Any):
            super().__init__()
            from downscale.ensemble import load_ensemble

            if ensemble is None:
                if path is None:
                    raise ValueError("downscale-ensemble needs model_args path=<run>/ensemble")
                ensemble = load_ensemble(path, mode=mode, device=device, dtype=getattr(torch, dtype))
            elif mode is not None:
                ensemble.mode = mode
            if ensemble.tokenizer is None:
                raise ValueError("the ensemble has no tokenizer")
            self.ens, self.tokenizer = ensemble, ensemble.tokenizer
            self._batch_size = max(1, int(batch_size)) if str(batch_size).isdigit() else 1
            positions = int(getattr(ensemble.students[0].config, "max_position_embeddings", 2048) or 2048)
            self._max_length = int(max_length or min(positions, 4096))
            self._max_gen_toks = int(max_gen_toks)

        @property
        def eot_token_id(self) -> int:
            return int(self.tokenizer.eos_token_id)

        @property
        def max_length(self) -> int:
            return self._max_length

        @property
        def device(self) -> torch.device:
            return self.ens.device

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_: Any) -> list[int]:
            return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

        def tok_decode(self, tokens: list[int]) -> str:
            return self.tokenizer.decode(tokens, skip_special_tokens=True)

        @torch.no_grad()
        def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False,
                                  **_: Any) -> list[tuple[float, bool]]:
            """(sum of log p(continuation | context), whether greedy decoding gives the continuation) per
            request; inputs longer than max_length keep their last max_length tokens."""
            items = []
            for j, (_key, ctx, cont) in enumerate(requests):
                whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
                items.append((j, whole, min(len(cont), len(whole) - 1)))
            order = sorted(items, key=lambda it: -len(it[1]))  # similar lengths share a batch
            results: list[tuple[float, bool] | None] = [None] * len(requests)
            for start in progress.bar(range(0, len(order), self._batch_size), disable=disable_tqdm,
                                      desc="downscale-ensemble loglikelihood"):
                batch = order[start:start + self._batch_size]
                width = max(len(whole) - 1 for _, whole, _ in batch)
                pad = self.eot_token_id
                ids = torch.tensor([whole[:-1] + [pad] * (width + 1 - len(whole)) for _, whole, _ in batch],
                                   device=self.device)  # right-padded inputs
                mask = torch.tensor([[1] * (len(whole) - 1) + [0] * (width + 1 - len(whole)) for _, whole, _ in batch],
                                    device=self.device)
                # only the positions that predict some row's continuation: [b, keep, V] scores, not [b, T, V]
                # (at a 128k vocabulary a 4k-token row's fp32 scores are 2 GB, twice with their log-softmax)
                keep = width - min(len(whole) - 1 - n_cont for _, whole, n_cont in batch)
                scores = self.ens(ids, attention_mask=mask, logits_to_keep=keep).logits  # [b, keep, V]
                off = width - keep
                for row, (j, whole, n_cont) in enumerate(batch):
                    end = len(whole) - 1  # position end - 1 predicts the last token
                    targets = torch.tensor(whole[end + 1 - n_cont:], device=self.device)
                    # the positions that predict the continuation, log-softmaxed for this row's span only
                    span = torch.log_softmax(scores[row, end - n_cont - off:end - off].float(), dim=-1)
                    score = float(span.gather(-1, targets[:, None]).sum())
                    greedy = bool((span.argmax(-1) == targets).all())
                    results[j] = (score, greedy)
                    self.cache_hook.add_partial("loglikelihood", requests[j][0], (score, greedy))
            return results  # type: ignore[return-value]

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
            """Total log-likelihood of each string, in disjoint windows of max_length tokens (the first
            token is predicted from the end-of-text token)."""
            out = []
            for req in progress.bar(requests, disable=disable_tqdm, desc="downscale-ensemble rolling"):
                (string,) = req.args
                windows = [_lm_utils.make_disjoint_window(w) for w in _lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)]
                scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows], disable_tqdm=True)
                total = sum(s for s, _ in scores)
                out.append(total)
                self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            return out

        @torch.no_grad()
        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
            """Greedy (or sampled, with do_sample) continuations, cut at the first stop sequence."""
            out = []
            for req in progress.bar(requests, disable=disable_tqdm, desc="downscale-ensemble generate"):
                context, gen_kwargs = req.args
                kwargs = dict(gen_kwargs or {})
                until = kwargs.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                eos_text = self.tokenizer.decode([self.eot_token_id])
                if eos_text and eos_text not in until:
                    until.append(eos_text)
                max_new = int(kwargs.pop("max_gen_toks", kwargs.pop("max_new_tokens", self._max_gen_toks)))
                do_sample = bool(kwargs.pop("do_sample", False))
                temperature = float(kwargs.pop("temperature", 1.0) or 1.0)
                ctx = self.tok_encode(context)[-max(1, self.max_length - max_new):] or [self.eot_token_id]
                ids = torch.tensor([ctx], device=self.device)
                gen = self.ens.generate(ids, max_new_tokens=max_new, do_sample=do_sample and temperature > 0,
                                        temperature=temperature, eos_token_id=self.eot_token_id)
                text = self.tok_decode(gen[0, len(ctx):].tolist())
                for stop in until:
                    if stop and stop in text:
                        text = text[:text.index(stop)]
                out.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            return out


def main(argv: list[str] | None = None) -> None:
    """``python -m downscale.harness <lm_eval arguments>``: lm-eval's command line with the ensemble registered."""
    if not HAVE_LM_EVAL:
        print("lm-eval is not installed: pip install 'downscale[lm-eval]' (or pip install lm-eval)", file=sys.stderr)
        raise SystemExit(2)
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
