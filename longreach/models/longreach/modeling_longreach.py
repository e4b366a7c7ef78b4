"""The longreach decoder: pre-norm blocks of (token mixer, SwiGLU MLP) with RMSNorm.

The token mixer of each layer comes from the mixer registry (``config.mixers``), so adding
a mixer never touches this file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from longreach.cache import LongReachCache
from longreach.layers import build_mixer
from longreach.layers.blocks import RMSNorm, SwiGLU
from longreach.models.compat import generate_cache_kwargs, one_cache, output_cache, output_fields
from longreach.models.longreach.configuration_longreach import LongReachConfig
from longreach.ops.backend import needs_value_check


class LongReachBlock(nn.Module):
    def __init__(self, config: LongReachConfig, layer_idx: int):
        super().__init__()
        self.mixer_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mixer = build_mixer(config.mixers[layer_idx], config, layer_idx)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, state=None) -> torch.Tensor:
        x = x + self.mixer(self.mixer_norm(x), positions, state)
        return x + self.mlp(self.mlp_norm(x))


class LongReachPreTrainedModel(PreTrainedModel):
    config_class = LongReachConfig
    config: LongReachConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LongReachBlock"]
    _supports_sdpa = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # each mixer keeps its own kind of state: the model builds a LongReachCache itself
        return False


class LongReachModel(LongReachPreTrainedModel):
    def __init__(self, config: LongReachConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(self.build_block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.build_model_parts(config)
        self.gradient_checkpointing = False
        self.post_init()

    def build_block(self, config: LongReachConfig, layer_idx: int) -> nn.Module:
        return LongReachBlock(config, layer_idx)

    def build_model_parts(self, config: LongReachConfig) -> None:
        """Model-level modules of a family built on this decoder (GCA: its retriever)."""

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def new_cache(self, memory: str | None = None) -> LongReachCache:
        """An empty generation cache: each layer's ``mixer.init_state()``. (``memory`` is
        for families with model-level memory, e.g. GCA; plain decoders ignore it.)"""
        return LongReachCache([layer.mixer.init_state() for layer in self.layers])

    def cache_bytes_per_token(self, dtype: torch.dtype | None = None) -> float:
        """Bytes the generation cache grows by per token on the compute device (0 when it is
        bounded), summed over its states; ``dtype`` defaults to the weights'."""
        return self.new_cache().bytes_per_token(dtype or self.embed_tokens.weight.dtype)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: LongReachCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: LongReachCache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        past_key_values = one_cache(past_key_values, cache)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be [batch, time], got shape {tuple(input_ids.shape)}")
            if needs_value_check(input_ids):
                self._check_ids(input_ids)
            inputs_embeds = self.embed_tokens(input_ids)
        if attention_mask is not None and needs_value_check(attention_mask) and not bool(attention_mask.bool().all()):
            raise ValueError(
                "padded batches are not supported: attention_mask must be all ones "
                "(run prompts of different lengths separately)"
            )
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if past_key_values is not None and not isinstance(past_key_values, LongReachCache):
            raise ValueError(
                f"past_key_values must be the LongReachCache this model returned, got {type(past_key_values).__name__}"
            )
        if use_cache and past_key_values is None:
            # while training, model-level memory (GCA) stays on the device to keep its gradients
            past_key_values = self.new_cache(memory="device" if self.training else None)
        if self.gradient_checkpointing and self.training:
            use_cache, past_key_values = False, None

        t = inputs_embeds.shape[1]
        start = past_key_values.seen_tokens if past_key_values is not None else 0
        limit = self.config.max_position_embeddings
        if limit is not None and start + t > limit:
            raise ValueError(
                f"sequence of {start + t} tokens is longer than this model allows "
                f"(max_position_embeddings={limit})"
            )
        if position_ids is not None:
            self._check_position_ids(position_ids, torch.arange(start, start + t, device=inputs_embeds.device))
        hidden, all_hidden = self.run_layers(inputs_embeds, start, past_key_values,
                                             output_hidden_states=bool(output_hidden_states))
        if past_key_values is not None:
            past_key_values.seen_tokens += t
        return BaseModelOutputWithPast(
            last_hidden_state=hidden,
            hidden_states=all_hidden,
            **output_fields(BaseModelOutputWithPast, past_key_values if use_cache else None),
        )

    def run_layers(self, embeds: torch.Tensor, start: int, cache: LongReachCache | None, *,
                   output_hidden_states: bool = False):
        """embed -> blocks -> norm for the tokens at positions ``start ..``; returns the final
        hidden states and, if asked, the input of every block plus the output."""
        positions = torch.arange(start, start + embeds.shape[1], device=embeds.device)
        hidden, all_hidden = embeds, [] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            if all_hidden is not None:
                all_hidden.append(hidden)
            if self.gradient_checkpointing and self.training:
                hidden = checkpoint(layer, hidden, positions, use_reentrant=False)
            else:
                hidden = layer(hidden, positions, cache[i] if cache is not None else None)
        hidden = self.norm(hidden)
        if all_hidden is not None:
            all_hidden.append(hidden)
        return hidden, tuple(all_hidden) if all_hidden is not None else None

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise ValueError(
                f"input_ids contain ids outside [0, {self.config.vocab_size}): "
                f"min {int(input_ids.min())}, max {int(input_ids.max())} (does the tokenizer match the model?)"
            )

    @staticmethod
    def _check_position_ids(position_ids, positions: torch.Tensor) -> None:
        t = positions.shape[0]
        given = position_ids.reshape(-1, t).to(positions.device)
        if not torch.equal(given, positions.expand(given.shape[0], t)):
            raise ValueError("position_ids must count on from the cache (0..T-1 without one); "
                             "custom positions are not supported")


class LongReachForCausalLM(LongReachPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    base_model_class = LongReachModel  # families swap in their own decoder

    def __init__(self, config: LongReachConfig):
        super().__init__(config)
        self.model = self.base_model_class(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def new_cache(self, memory: str | None = None) -> LongReachCache:
        """An empty generation cache (see ``LongReachModel.new_cache``)."""
        return self.model.new_cache(memory)

    def cache_bytes_per_token(self, dtype: torch.dtype | None = None) -> float:
        """Bytes the generation cache grows by per token (0 when bounded)."""
        return self.model.cache_bytes_per_token(dtype)

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: LongReachCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        cache: LongReachCache | None = None,
        loss_weights: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """The usual causal-LM forward. ``loss_weights`` (``[batch, time]``, aligned with
        ``labels``) weighs each labelled token's cross-entropy: the loss is
        ``sum(w * ce) / sum(w)`` over labelled positions (e.g. to let the few answer tokens of
        a retrieval task count as much as a sequence of text)."""
        past_key_values = one_cache(past_key_values, cache)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            if labels.shape != logits.shape[:2]:
                raise ValueError(f"labels shape {tuple(labels.shape)} does not match input shape {tuple(logits.shape[:2])}")
            # HF convention: labels are aligned with input_ids; token t predicts label t+1
            targets = labels[:, 1:].reshape(-1).to(logits.device)
            flat = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            if loss_weights is None:
                loss = F.cross_entropy(flat, targets, ignore_index=-100)
            else:
                if loss_weights.shape != labels.shape:
                    raise ValueError(f"loss_weights shape {tuple(loss_weights.shape)} does not "
                                     f"match labels shape {tuple(labels.shape)}")
                ce = F.cross_entropy(flat, targets, ignore_index=-100, reduction="none")
                w = loss_weights[:, 1:].reshape(-1).to(ce.device, torch.float32)
                w = w * (targets != -100)
                loss = (ce * w).sum() / w.sum().clamp_min(1e-12)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=out.hidden_states,
            **output_fields(CausalLMOutputWithPast, output_cache(out)),
        )

    def generate(self, *args, **kwargs):
        """``GenerationMixin.generate``; a cache passed as ``cache=`` or ``past_key_values=``
        reaches it under the name this transformers version reads. With ``prefill_chunk_size``
        the prompt is fed in chunks through an empty cache, a new one (``new_cache()``) unless
        one is passed (HF's chunked prefill needs it before the first forward, where this model
        would otherwise build it)."""
        config = kwargs.get("generation_config") or (args[1] if len(args) > 1 else None) or self.generation_config
        chunked = kwargs.get("prefill_chunk_size", getattr(config, "prefill_chunk_size", None)) is not None
        cache = one_cache(kwargs.pop("past_key_values", None), kwargs.pop("cache", None))
        if chunked and cache is None and kwargs.get("use_cache", config.use_cache) is not False:
            cache = self.new_cache()
        elif chunked and cache is not None and cache.get_seq_length() > 0:
            # HF feeds the chunks from the prompt's first token on: it would re-feed cached ones
            raise ValueError(
                f"prefill_chunk_size needs an empty cache; this one has seen {cache.get_seq_length()} "
                "tokens (pass a new cache, or prefill_chunk_size=None)"
            )
        if cache is not None:
            kwargs.update(generate_cache_kwargs(cache))
        return super().generate(*args, **kwargs)

    def prepare_inputs_for_generation(
        self, input_ids, past_key_values=None, attention_mask=None, inputs_embeds=None, use_cache=True,
        cache=None, next_sequence_length=None, **kwargs
    ):
        past_key_values = one_cache(past_key_values, cache)
        seen = past_key_values.get_seq_length() if past_key_values is not None else 0
        if seen > 0:
            # feed only the tokens the cache has not seen. While decoding generate says how many
            # are new (next_sequence_length) or its mask spans seen + new tokens; a chunk of its
            # chunked prefill (no mask) holds new tokens only, and never more than the cache saw
            new = next_sequence_length
            if new is None and attention_mask is not None:
                new = attention_mask.shape[1] - seen
            elif new is None:
                new = input_ids.shape[1] - seen if input_ids.shape[1] > seen else input_ids.shape[1]
            if new < 1:
                raise ValueError(
                    f"nothing to feed: the cache has seen {seen} tokens, the input holds no new one "
                    "(pass the tokens after the cached ones, or a new cache)"
                )
            input_ids = input_ids[:, -new:]
            inputs_embeds = None
        inputs = {"past_key_values": past_key_values, "use_cache": use_cache, "attention_mask": attention_mask}
        if inputs_embeds is not None:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            inputs["input_ids"] = input_ids
        if "logits_to_keep" in kwargs:
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs
