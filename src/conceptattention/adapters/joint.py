"""The concept stream through dual-stream (MM-DiT) blocks that use diffusers' text-stream names.

Flux.1 and SD3 blocks share the text-stream modules ConceptAttention runs concepts
through: ``norm1_context`` (AdaLayerNormZero), ``attn.add_{q,k,v}_proj`` (+ optional
``norm_added_{q,k}``), ``attn.to_add_out``, ``norm2_context`` and ``ff_context``. This module
holds that path once, as the defaults of a :class:`JointPath`; a backend gives its processor
(the stock joint attention, mirrored op for op), its concept conditioning and only the modules
that differ.

It also holds the parts several backends compose (no backend imports another): the Flux-family
joint attention (``FluxStyleProcessor``), position-id geometry, the dead-last-block and
default-layer rules, and the packed-latent encode forward.

Per block and traced forward, data flows one way through a :class:`BlockPass`:
pre-hook (modulate concepts) -> processor (concept rows, saliency) -> post-hook
(residual update).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic

import torch
from diffusers.models.embeddings import apply_rotary_emb

from conceptattention.adapters.base import (
    Backend,
    BackendSpec,
    BlockRecord,
    CallArguments,
    Conditioning,
    ForwardRecord,
    LayerRule,
    RunState,
    StopForward,
    TensorFacts,
    last_blocks,
)
from conceptattention.concepts import ConceptEmbeddings
from conceptattention.core import TokenGrid, block_saliency, concept_attention
from conceptattention.errors import ConceptAttentionError


@dataclass
class BlockPass:
    """One block's concept data, handed from the pre-hook to the processor to the post-hook.

    The processor consumes ``normed`` and ``gate_msa`` (attention and its residual update) and
    clears ``normed``, so only the (B, D_model) feed-forward modulation outlives the attention.

    Attributes:
        index: the block.
        normed: (B, C, D_model) concept tokens after ``norm1_context`` (None once attended).
        gate_msa, shift_mlp, scale_mlp, gate_mlp: (B, D_model) the AdaLayerNormZero gates, shifts, scales.
        attended: the processor has applied the attention residual update.
    """

    index: int
    normed: torch.Tensor | None
    gate_msa: torch.Tensor
    shift_mlp: torch.Tensor
    scale_mlp: torch.Tensor
    gate_mlp: torch.Tensor
    attended: bool = False


def projections(attn: Any, hidden_states: torch.Tensor, added: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of the image stream (``added=False``) or the text stream (``added=True``), (B, S, H * D)."""
    if getattr(attn, "fused_projections", False):
        fused = attn.to_added_qkv if added else attn.to_qkv
        q, k, v = fused(hidden_states).chunk(3, dim=-1)
        return q, k, v
    if added:
        return attn.add_q_proj(hidden_states), attn.add_k_proj(hidden_states), attn.add_v_proj(hidden_states)
    return attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)


def apply_norm(module: Any, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``, or ``x`` when the model has no such norm (optional QK-norm)."""
    return x if module is None else module(x)


@dataclass(frozen=True)
class TextAttention:
    """The attention weights concept tokens go through: the text stream's, in the model's own modules.

    Attributes:
        qkv: (B, C, D_model) normed concepts -> q, k, v, each (B, C, H * D).
        norm_q, norm_k: per-head QK-norm modules, or None.
        out: (B, C, H * D) attention output -> (B, C, D_model), the output projection.
    """

    qkv: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    norm_q: Any
    norm_k: Any
    out: Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TextPath:
    """The modules concept tokens go through in one block, resolved once when the stream is installed.

    Attributes:
        modulate: ``(concepts (B, C, D), emb) -> (normed (B, C, D), gate_msa, shift_mlp, scale_mlp, gate_mlp)``,
            the block's text-stream norm and modulation.
        attention: the text-stream (or shared) attention weights.
        norm: the norm before the feed-forward.
        feedforward: the text-stream (or shared) feed-forward.
    """

    modulate: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]
    attention: TextAttention
    norm: Callable[[torch.Tensor], torch.Tensor]
    feedforward: Callable[[torch.Tensor], torch.Tensor]


class JointConceptStream:
    """The concept residual stream of one attachment, through the text-stream weights.

    Args:
        transformer: the traced transformer.
        state: the session's run state.
        path: the backend's text path (concept embedding, conditioning, the block modules).
        attention: attribute of a block holding its joint attention module.
    """

    def __init__(self, transformer: Any, state: RunState, path: JointPath, attention: str) -> None:
        self.transformer = transformer
        self.state = state
        self.path = path
        self.attention = attention
        self.hidden: torch.Tensor | None = None  # (B_rows, C, D_model)
        self.temb: torch.Tensor | None = None  # the forward's concept conditioning (None: per block only)
        self.current: BlockPass | None = None
        self.paths: list[TextPath] = []  # per block 0..last selected, resolved at install

    def install(
        self,
        stack: contextlib.ExitStack,
        blocks: torch.nn.ModuleList,
        originals: dict[str, Any],
        make_processor: Callable[[int, Any], Any],
    ) -> None:
        """Replace the processors of blocks 0..last selected (``originals``, in block order) and hook those blocks."""
        processors = dict(self.transformer.attn_processors)
        for index, (name, original) in enumerate(originals.items()):
            processors[name] = make_processor(index, original)
        self.transformer.set_attn_processor(processors)
        for index in range(len(originals)):
            block = blocks[index]
            norm, feedforward = self.path.feedforward(block)
            modulate = functools.partial(self.path.modulation, block)
            text_attention = self.path.attention(getattr(block, self.attention))
            self.paths.append(TextPath(modulate, text_attention, norm, feedforward))
            stack.callback(block.register_forward_pre_hook(self._pre_hook(index), with_kwargs=True).remove)
            stack.callback(block.register_forward_hook(self._post_hook(index), with_kwargs=True).remove)

    def runs(self, index: int) -> bool:
        return self.state.runs_block(index)

    # -- hooks -----------------------------------------------------------------------------------
    @torch.no_grad()
    def _start(self, hidden_states: torch.Tensor) -> None:
        """Concept tokens and conditioning of this forward, at its first block.

        Done here rather than in the transformer pre-hook so that offloading hooks have
        already moved the weights to the execution device.
        """
        context = self.state.forward
        assert context is not None
        record = context.record
        dtype, device = hidden_states.dtype, hidden_states.device
        rows = len(range(*record.rows.indices(hidden_states.shape[0])))
        path = self.path
        inputs = path.concept_inputs(self.state.concepts, device, dtype)
        concepts = path.embed(self.transformer, inputs, record)  # (C | B_rows, C, D)
        self.hidden = (concepts if concepts.ndim == 3 else concepts.unsqueeze(0)).expand(rows, -1, -1)  # (B_rows, C, D)
        forward = path.forward_conditioning
        self.temb = None if forward is None else forward(self.transformer, record, dtype)

    def _pre_hook(self, index: int):
        @torch.no_grad()  # the concept stream is never differentiated (checkpointed or grad-enabled forwards)
        def pre_hook(block, args, kwargs):
            if not self.runs(index):
                return None
            arguments = CallArguments(block, args, kwargs)
            if index == 0 or self.hidden is None:
                self._start(arguments["hidden_states"])
            context = self.state.forward
            assert context is not None
            per_block = self.path.block_conditioning
            emb = self.temb if per_block is None else per_block(context.record, arguments)
            self.current = BlockPass(index, *self.paths[index].modulate(self.hidden, emb))
            return None

        return pre_hook

    def _post_hook(self, index: int):
        @torch.no_grad()
        def post_hook(block, args, kwargs, output):
            if not self.runs(index):
                return None
            step, self.current = self.current, None
            assert step is not None and step.index == index and step.attended and self.hidden is not None
            concepts = self.hidden
            path = self.paths[index]
            normed = path.norm(concepts) * (1 + step.scale_mlp[:, None]) + step.shift_mlp[:, None]
            concepts = concepts + step.gate_mlp.unsqueeze(1) * path.feedforward(normed)
            if concepts.dtype == torch.float16:
                concepts = concepts.clip(-65504, 65504)
            self.hidden = concepts
            if self.state.observers:
                record = BlockRecord(index, concepts)
                for observe in self.state.observers:
                    observe(record)
            if index == self.state.last_block and self.state.stop_after_last_block:
                raise StopForward
            return None

        return post_hook

    # -- called by the processors ------------------------------------------------------------------
    @torch.no_grad()
    def concept_rows(
        self,
        index: int,
        q_x: torch.Tensor,
        k_x: torch.Tensor,
        v_x: torch.Tensor,
        o_x: torch.Tensor,
        concept_rope: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """The concept query rows of a block and its saliency, from the real pass's image tensors.

        Args:
            index: the block (its text path, resolved at install, gives the concept projections).
            q_x, k_x, v_x: (B, H, N, D) image queries, keys, values exactly as the real attention
                used them (after QK-norm and RoPE); all image tokens, reference images included.
            o_x: (B, N, H * D) image attention output before the output projection.
            concept_rope: rotates (B, C, H, D) concept queries/keys with the model's own RoPE at the
                backend's concept position; None where concepts carry no rotation (Flux.1 and
                Chroma: text position 0; SD3: no RoPE on text).
        """
        state = self.state
        config = state.config
        step = self.current
        context = state.forward
        assert step is not None and step.index == index and context is not None
        record = context.record
        rows = record.rows  # the conditional half under batched CFG
        q_x, k_x, v_x, o_x = q_x[rows], k_x[rows], v_x[rows], o_x[rows]
        assert step.normed is not None and self.hidden is not None
        weights = self.paths[index].attention
        q_c, k_c, v_c = weights.qkv(step.normed)
        step.normed = None  # not needed past the projections
        heads = (q_x.shape[1], q_x.shape[-1])  # (H, D)
        q_c = apply_norm(weights.norm_q, q_c.unflatten(-1, heads))  # (B, C, H, D)
        k_c = apply_norm(weights.norm_k, k_c.unflatten(-1, heads))
        if concept_rope is not None:
            q_c, k_c = concept_rope(q_c), concept_rope(k_c)
        q_c, k_c = q_c.transpose(1, 2), k_c.transpose(1, 2)  # (B, H, C, D)
        v_c = v_c.unflatten(-1, heads).transpose(1, 2)
        # Concepts attend over every image token, as text does in the real attention.
        o_c = concept_attention(q_c, k_c, v_c, k_x, v_x, keys=config.concept_keys)  # (B, H, C, D)
        o_c = o_c.transpose(1, 2).flatten(2).to(o_x.dtype)  # (B, C, H * D)
        if index in state.accumulator.blocks:
            target = record.target  # scores only for the target grid (not reference-image tokens)
            saliency = block_saliency(
                config.score_space,
                o_c=o_c,
                o_x=o_x[:, target],
                q_x=q_x[:, :, target],
                k_c=k_c,
                v_c=v_c,
                v_x=v_x[:, :, target],
                softmax=state.softmax,
            )  # (B, C, N_target)
            state.accumulator.add(saliency, index, items=context.row_items, num_items=context.num_items)
        # The attention half of the residual update, as the text stream's: output projection, gate.
        self.hidden = self.hidden + step.gate_msa.unsqueeze(1) * weights.out(o_c)
        step.attended = True


class ConceptProcessor:
    """Base of the installed processors: the block index, the concept stream, the original's settings.

    Subclasses mirror one stock processor op for op and call :meth:`JointConceptStream.concept_rows`.
    """

    def __init__(self, block_index: int, stream: JointConceptStream, original: Any = None) -> None:
        self.block_index = block_index
        self.stream = stream
        # Keep whatever attention backend / parallel config the user selected on the original.
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)

    def joint_attention(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The stock processors' joint attention through diffusers' dispatcher: (B, S, H, D) q/k/v -> (B, S, H * D)."""
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        joint = dispatch_attention_fn(
            query, key, value, attn_mask=mask, backend=self._attention_backend, parallel_config=self._parallel_config
        )
        return joint.flatten(2, 3).to(query.dtype)


def pooled_states(concepts: ConceptEmbeddings, device: torch.device, dtype: torch.dtype) -> Any:
    """The (C, D_text) pooled concept states on the forward's device and dtype."""
    return concepts.states.to(device, dtype)


def context_embedder(transformer: Any, states: Any, record: ForwardRecord) -> torch.Tensor:
    """(C, D_text) -> (C, D_model) through ``transformer.context_embedder``, as the prompt is embedded."""
    return transformer.context_embedder(states)


def added_projections(attn: Any) -> TextAttention:
    """The text-stream attention weights in diffusers' dual-stream names: ``add_{q,k,v}_proj``, ``norm_added_*``,
    ``to_add_out``."""
    return TextAttention(
        lambda x: projections(attn, x, added=True), attn.norm_added_q, attn.norm_added_k, attn.to_add_out
    )


def norm1_context(block: Any, hidden: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The block's ``norm1_context`` (AdaLayerNormZero) on (B, C, D) concepts: normed and the (B, D) attention gate,
    MLP shift, MLP scale and MLP gate."""
    return block.norm1_context(hidden, emb=emb)


def context_feedforward(block: Any) -> tuple[Callable, Callable]:
    """The block's text-stream ``(norm2_context, ff_context)``."""
    return block.norm2_context, block.ff_context


def no_install_check(transformer: Any, state: RunState) -> None:
    return None


def stock_processors(spec: BackendSpec, transformer: Any, indices: Sequence[int]) -> dict[str, Any]:
    """The processors of the blocks to trace, after checking each is a stock one we replace."""
    originals = transformer.attn_processors
    found = {}
    for index in indices:
        name = f"{spec.double_blocks}.{index}.{spec.attention}.processor"
        processor = originals[name]
        if type(processor).__name__ not in spec.processor_classes:
            stock = " or ".join(spec.processor_classes)
            raise ConceptAttentionError(
                f"`{name}` is a {type(processor).__name__}; ConceptAttention replaces only the stock {stock} "
                "(IP-Adapter, fused-projection and custom processors are not supported). Restore it with "
                f"`transformer.set_attn_processor({spec.processor_classes[0]}())`, unload the adapter or "
                "call `unfuse_qkv_projections()` first."
            )
        found[name] = processor
    return found


@dataclass(frozen=True)
class JointPath(Generic[Conditioning]):
    """The concept stream of dual-stream blocks, as parts: how concepts enter and which modules they go through.

    The defaults are diffusers' dual-stream text-stream names; a backend gives only what differs.
    Exactly one of ``forward_conditioning`` and ``block_conditioning`` is given.

    Attributes:
        processor: the installed processor class, built as ``processor(index, stream, original)``.
        forward_conditioning: ``(transformer, record, dtype) -> (B_rows, D_model)`` the concepts' conditioning for a
            whole forward: the timestep embedding, nothing from the prompt.
        block_conditioning: ``(record, block call arguments) -> emb``, where the conditioning is read per block.
        concept_inputs: ``(concepts, device, dtype) -> states`` what :attr:`embed` takes.
        embed: ``(transformer, states, record) -> (C | B_rows, C, D_model)`` concept tokens, as the prompt is embedded.
        attention: ``attn -> TextAttention``, the block's text-stream (or shared) attention weights.
        modulation: ``(block, (B, C, D) concepts, emb) -> (normed, gate_msa, shift_mlp, scale_mlp, gate_mlp)``.
        feedforward: ``block -> (norm, feed-forward)`` applied after the attention residual.
        check: refuses a model or concepts this path cannot trace, before anything is installed.
    """

    processor: type
    forward_conditioning: Callable[[Any, ForwardRecord[Conditioning], torch.dtype], torch.Tensor] | None = None
    block_conditioning: Callable[[ForwardRecord[Conditioning], CallArguments], torch.Tensor] | None = None
    concept_inputs: Callable[[ConceptEmbeddings, torch.device, torch.dtype], Any] = pooled_states
    embed: Callable[[Any, Any, ForwardRecord[Conditioning]], torch.Tensor] = context_embedder
    attention: Callable[[Any], TextAttention] = added_projections
    modulation: Callable[[Any, torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]] = norm1_context
    feedforward: Callable[[Any], tuple[Callable, Callable]] = context_feedforward
    check: Callable[[Any, RunState], None] = no_install_check

    def __post_init__(self) -> None:
        if (self.forward_conditioning is None) == (self.block_conditioning is None):
            raise TypeError("give exactly one of `forward_conditioning` and `block_conditioning`")

    def install(self, backend: Backend, transformer: Any, state: RunState, stack: contextlib.ExitStack) -> None:
        self.check(transformer, state)
        originals = stock_processors(backend.spec, transformer, range(state.last_block + 1))
        stream = JointConceptStream(transformer, state, self, backend.spec.attention)
        stream.install(stack, backend.blocks(transformer), originals, lambda i, p: self.processor(i, stream, p))


# -- parts shared by the Flux-family backends (Flux.1, Chroma, Flux.2, HunyuanVideo's block layout) -----------
def _grid_of_ids(img_ids: torch.Tensor) -> tuple[int, int]:
    """(h, w) of image ids (N, 3) = (modality, origin + row, origin + column), in one host read."""
    ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    (first_row, first_col), (last_row, last_col) = ids[[0, -1], 1:3].tolist()
    return int(last_row - first_row) + 1, int(last_col - first_col) + 1


_ids_grid = TensorFacts(_grid_of_ids)


def image_grid(inputs: Mapping[str, Any]) -> TokenGrid:
    """The (h, w) token grid of a Flux-style forward, from its ``img_ids`` (read once per pipeline call)."""
    h, w = _ids_grid(inputs["img_ids"])
    num_tokens = inputs["hidden_states"].shape[1]
    if h * w != num_tokens:
        raise ConceptAttentionError(
            f"The image position ids describe a {h}x{w} grid but there are {num_tokens} image tokens; "
            "image-conditioned variants with extra tokens (Kontext, reference images) are not supported"
        )
    return TokenGrid(h, w)


def flux_joint_attention(
    processor: ConceptProcessor,
    attn: Any,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stock joint attention of Flux.1, Chroma and Flux.2 double blocks, up to the output projections.

    The same operations in the same order as diffusers' ``FluxAttnProcessor`` and
    ``Flux2AttnProcessor`` (which agree up to there), on the user's attention backend.

    Returns:
        query, key, value: (B, T + N, H, D) after QK-norm and RoPE, [text; image];
        text_out (B, T, H * D) and image_out (B, N, H * D): attention outputs before the projections.
    """
    query, key, value = projections(attn, hidden_states, added=False)
    query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))  # (B, N, H, D)
    key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
    value = value.unflatten(-1, (-1, attn.head_dim))

    text_query, text_key, text_value = projections(attn, encoder_hidden_states, added=True)
    text_query = attn.norm_added_q(text_query.unflatten(-1, (-1, attn.head_dim)))  # (B, T, H, D)
    text_key = attn.norm_added_k(text_key.unflatten(-1, (-1, attn.head_dim)))
    text_value = text_value.unflatten(-1, (-1, attn.head_dim))

    query = torch.cat([text_query, query], dim=1)  # (B, T + N, H, D)
    key = torch.cat([text_key, key], dim=1)
    value = torch.cat([text_value, value], dim=1)
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)  # type: ignore[arg-type,assignment]
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)  # type: ignore[arg-type,assignment]

    joint = processor.joint_attention(query, key, value, attention_mask)  # (B, T + N, H * D)
    text_len = encoder_hidden_states.shape[1]
    text_out, image_out = joint.split_with_sizes([text_len, joint.shape[1] - text_len], dim=1)
    return query, key, value, text_out, image_out


def image_rows(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, text_len: int):
    """The image part of [text; image] (B, S, H, D) q/k/v, as (B, H, N, D) each (reused, not recomputed)."""
    return tuple(t[:, text_len:].transpose(1, 2) for t in (query, key, value))


class FluxStyleProcessor(ConceptProcessor):
    """The stock joint attention of Flux-family double blocks plus the one-way concept attention of one block.

    Serves ``FluxAttnProcessor`` as is. Processors that agree with it up to the output projections
    set ``contiguous_outputs = False`` (they project without ``.contiguous()``), and backends whose
    text carries real positions give the concepts' position ids (:meth:`concept_position_ids`); the
    rotation is then made with the model's own ``pos_embed`` once per device. The image and text
    outputs are computed with the same operations, in the same order, as the stock processor (on the
    user's attention backend), so they are bit-identical to an untraced run. Returns exactly the two
    tensors the stock processor returns.
    """

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert encoder_hidden_states is not None  # double blocks always pass the text stream
        query, key, value, text_out, image_out = flux_joint_attention(
            self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb
        )
        if self.stream.runs(self.block_index):
            q_x, k_x, v_x = image_rows(query, key, value, text_out.shape[1])
            rope = self.concept_rope(image_out.device) if image_rotary_emb is not None else None
            self.stream.concept_rows(self.block_index, q_x, k_x, v_x, image_out, rope)
        return self.output_projections(attn, image_out, text_out)

    contiguous_outputs: ClassVar[bool] = True  # FluxAttnProcessor makes the outputs contiguous before projecting

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rotary: dict[torch.device, tuple[torch.Tensor, torch.Tensor] | None] = {}

    def concept_position_ids(self, device: torch.device) -> torch.Tensor | None:
        """(C, axes) the concepts' text position ids for the model's ``pos_embed``; None: no rotation (the default:
        text position ids 0, where RoPE is the identity)."""
        return None

    def concept_rope(self, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The rotation of (B, C, H, D) concept q/k at :meth:`concept_position_ids`, computed once per device (the
        positions are fixed for an attachment)."""
        if device not in self._rotary:
            ids = self.concept_position_ids(device)
            self._rotary[device] = None if ids is None else self.stream.transformer.pos_embed(ids)  # (C, D) cos, sin
        rotary = self._rotary[device]
        if rotary is None:
            return None

        def rotate(x: torch.Tensor) -> torch.Tensor:
            return apply_rotary_emb(x, rotary, sequence_dim=1)  # type: ignore[arg-type,return-value]

        return rotate

    def output_projections(self, attn: Any, image_out: torch.Tensor, text_out: torch.Tensor):
        """The stock processor's output projections."""
        if self.contiguous_outputs:
            image_out, text_out = image_out.contiguous(), text_out.contiguous()
        image_out = attn.to_out[0](image_out)
        image_out = attn.to_out[1](image_out)
        text_out = attn.to_add_out(text_out)
        return image_out, text_out


def dead_last_double_block(transformer: Any, blocks: torch.nn.ModuleList) -> dict[int, str]:
    """Flux-family rule: without single-stream blocks after it, the last double block's text output is dead."""
    if transformer.config.num_single_layers > 0:
        return {}
    return {len(blocks) - 1: "with no single-stream blocks after it, its text output feeds nothing, so its "
                             "text-query weights were never trained"}  # fmt: skip


def flux_family_layers(count: int) -> LayerRule:
    """The block rules Flux-family double-stream models share (Flux.1, Chroma, Flux.2, LongCat-Image): the last
    double block is dead only when no single-stream block follows it; the default is the last ``count`` usable."""
    return LayerRule(default=last_blocks(count), excluded=dead_last_double_block)


def packed_pixels_per_token(pipe: Any, default_scale: int) -> int:
    """Pixels per token side of pipelines that pack 2x2 latent patches into one token."""
    return int(getattr(pipe, "vae_scale_factor", default_scale)) * 2


def packed_latent_forward(pipe: Any, noisy_latents: torch.Tensor, t: float, arguments: Mapping[str, Any]) -> None:
    """One Flux-pipeline transformer forward: latents packed as the pipeline packs them, time ``t`` in [0, 1]."""
    batch, channels, height, width = noisy_latents.shape
    packed = pipe._pack_latents(noisy_latents, batch, channels, height, width)  # (B, N, 4c)
    timestep = torch.full((batch,), float(t), device=packed.device, dtype=packed.dtype)
    pipe.transformer(hidden_states=packed, timestep=timestep, **arguments, return_dict=False)
