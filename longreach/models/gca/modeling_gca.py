"""The GCA language model: a longreach decoder whose upper ``gca`` layers read chunks that a
causal retriever fetched from the whole past (Hu et al., ICML 2025).

The stream the layers see holds the user's tokens plus, with ``landmark="token"``, one
landmark position per chunk; users never see it: their tokens go in, one output per token
comes out. After the lower stack, every completed chunk is encoded into the chunk memory; the
first layer of each retrieval group selects the top-k chunks for its group; each gca layer
adds its read of them to its MLP input.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from longreach.cache.gca import GCACache
from longreach.layers.blocks import RMSNorm, SwiGLU
from longreach.layers.gca import GCAMixer, GCARetrieval
from longreach.layers.registry import make_options, split_spec
from longreach.models.gca.configuration_gca import GCAConfig
from longreach.models.gca.retrieval import GCAStack
from longreach.models.longreach.modeling_longreach import (
    LongReachBlock,
    LongReachForCausalLM,
    LongReachModel,
)


class GCABlock(nn.Module):
    """Pre-norm block whose mixer is a GCA layer: the window attention goes to the residual
    stream, the read of the retrieved chunks to the MLP input (the paper's design). With
    ``gca.bypass`` the read also joins the residual stream past the MLP, so what was
    retrieved reaches later layers and the head directly (Leng et al.'s bypassing residual
    path): ``out = h1 + r + MLP(norm(h1 + r))``."""

    def __init__(self, config: GCAConfig, layer_idx: int):
        super().__init__()
        options = make_options(GCAMixer.Options, "gca", split_spec(config.mixers[layer_idx])[1], layer_idx)
        self.mixer_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mixer = GCAMixer(config, layer_idx, options)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)
        self.bypass = bool(config.gca["bypass"])

    def forward(self, x: torch.Tensor, positions: torch.Tensor, state=None,
                retrieval: GCARetrieval | None = None) -> torch.Tensor:
        h = self.mixer_norm(x)
        x = x + self.mixer(h, positions, state)
        if retrieval is None:
            return x + self.mlp(self.mlp_norm(x))
        read = self.mixer.read(h, retrieval)
        out = x + self.mlp(self.mlp_norm(x + read))
        return out + read if self.bypass else out


class GCAModel(LongReachModel):
    config_class = GCAConfig
    _no_split_modules = ["LongReachBlock", "GCABlock"]

    def build_block(self, config: GCAConfig, layer_idx: int) -> nn.Module:
        if layer_idx in config.gca_layers:
            return GCABlock(config, layer_idx)
        return LongReachBlock(config, layer_idx)

    def build_model_parts(self, config: GCAConfig) -> None:
        self.gca = GCAStack(config, config.gca, config.gca_layers)

    def new_cache(self, memory: str | None = None) -> GCACache:
        """An empty generation cache. ``memory`` says where the chunk memory lives: "cpu"
        (default, pinned on CUDA), "disk:PATH", or "device" (default: ``config.gca``)."""
        state = self.gca.new_state(memory, device=self.embed_tokens.weight.device)
        return GCACache([layer.mixer.init_state() for layer in self.layers], memory=state)

    def host_cache_bytes_per_token(self, dtype: torch.dtype | None = None) -> float:
        """Host memory (RAM) a generation cache grows by per token: the chunk keys/values
        when the chunk memory is "cpu" (the default), else 0."""
        return self.new_cache().memory.host_bytes_per_token(dtype or self.embed_tokens.weight.dtype)

    def run_layers(self, embeds: torch.Tensor, start: int, cache: GCACache | None, *,
                   output_hidden_states: bool = False):
        """The layer stack over the stream (tokens + landmark positions); the chunk memory is
        filled after the lower stack and read by the gca layers."""
        gca = self.gca
        state = cache.memory if cache is not None else gca.new_state("device")
        stream, s0, answer = gca.build_stream(embeds, start)
        positions = torch.arange(s0, s0 + stream.shape[1], device=embeds.device)
        hidden, retrieval = stream, None
        all_hidden = [] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            if all_hidden is not None:
                all_hidden.append(hidden[:, answer])
            if i == gca.first_layer:
                gca.encode(state, hidden, s0)
            if i in gca.group_starts:
                retrieval = gca.retrieve(gca.group_starts.index(i), state, hidden, s0, training=self.training)
            extra = (retrieval,) if isinstance(layer, GCABlock) else ()
            if self.gradient_checkpointing and self.training:
                hidden = checkpoint(layer, hidden, positions, None, *extra, use_reentrant=False)
            else:
                hidden = layer(hidden, positions, cache[i] if cache is not None else None, *extra)
        hidden = self.norm(hidden)[:, answer]
        if all_hidden is not None:
            all_hidden.append(hidden)
        return hidden, tuple(all_hidden) if all_hidden is not None else None


class GCAForCausalLM(LongReachForCausalLM):
    config_class = GCAConfig
    base_model_class = GCAModel
    _no_split_modules = ["LongReachBlock", "GCABlock"]

    def host_cache_bytes_per_token(self, dtype: torch.dtype | None = None) -> float:
        """Host memory a generation cache grows by per token (``GCAModel``'s)."""
        return self.model.host_cache_bytes_per_token(dtype)
