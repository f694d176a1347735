"""Reading an HF ``config.json`` field by field, so that no field is silently ignored.

Every adapter pulls the fields it maps with :meth:`HFConfig.take`; fields that do not change the
model (metadata, token ids, generation defaults) are listed in :data:`METADATA_FIELDS`; anything
left over at :meth:`HFConfig.finish` is an error naming it.
"""

from __future__ import annotations

from typing import Any

from moelab.errors import ConfigError

# Fields of any HF config that do not change the network or its weights (PretrainedConfig metadata,
# token ids, output switches, legacy generation defaults that old config.json files carry).
METADATA_FIELDS = frozenset({
    "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype", "_name_or_path", "model_type",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "use_cache", "output_router_logits", "output_attentions", "output_hidden_states", "return_dict",
    "id2label", "label2id", "num_labels", "problem_type", "chunk_size_feed_forward", "is_encoder_decoder",
    "is_decoder", "add_cross_attention", "cross_attention_hidden_size", "tie_encoder_decoder", "tokenizer_class",
    "finetuning_task", "prefix", "task_specific_params", "pruned_heads", "torchscript", "use_bfloat16",
    "tf_legacy_loss", "_attn_implementation_autoset", "_commit_hash", "max_length", "min_length", "do_sample",
    "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p",
    "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "use_return_dict",
})

_MISSING = object()


class HFConfig:
    """A config.json dict with a record of which fields were read."""

    def __init__(self, data: dict[str, Any], where: str = "config.json", counting_only: bool = False):
        self.data = dict(data)
        self.where = where
        # True when the config is read only to count parameters: numerics-only fields that moelab
        # cannot run yet (scaled RoPE) are then tolerated, since they change no parameter shape.
        self.counting_only = counting_only
        self.model_type = data.get("model_type")
        self._taken: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.data and self.data[name] is not None

    def take(self, name: str, default: Any = _MISSING, *aliases: str) -> Any:
        """The value of ``name`` (or the first present alias), else ``default``; marks all as read."""
        value = _MISSING
        for key in (name, *aliases):
            self._taken.add(key)
            if value is _MISSING and key in self.data and self.data[key] is not None:
                value = self.data[key]
        if value is _MISSING:
            if default is _MISSING:
                raise self.error(name, None, "required field is missing")
            return default
        return value

    def take_int(self, name: str, default: Any = _MISSING, *aliases: str, minimum: int = 1) -> int:
        value = self.take(name, default, *aliases)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.error(name, value, f"must be an integer >= {minimum}")
        return value

    def take_float(self, name: str, default: Any = _MISSING, *aliases: str, minimum: float = 0.0,
                   allow_equal: bool = True) -> float:
        value = self.take(name, default, *aliases)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum or (
                not allow_equal and value == minimum):
            raise self.error(name, value, f"must be a number {'>=' if allow_equal else '>'} {minimum}")
        return float(value)

    def take_bool(self, name: str, default: Any = _MISSING) -> bool:
        value = self.take(name, default)
        if not isinstance(value, bool):
            raise self.error(name, value, "must be true or false")
        return value

    def ignore(self, *names: str) -> None:
        """Mark fields as read on purpose (each caller says why in a comment)."""
        self._taken.update(names)

    def error(self, name: str, value: Any, fix: str) -> ConfigError:
        return ConfigError(f"{self.where} ({self.model_type}) field {name}", value, fix)

    def finish(self) -> None:
        left = sorted(k for k in self.data if k not in self._taken and k not in METADATA_FIELDS)
        if left:
            raise ConfigError(
                f"{self.where} ({self.model_type}) field {left[0]}", self.data[left[0]],
                f"moelab cannot honour this field (unmapped fields: {', '.join(left)}); "
                "remove it if it does not change the model, or open an issue")
