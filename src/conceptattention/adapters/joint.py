"""The concept stream through dual-stream (MM-DiT) blocks and the single-stream blocks that follow them.

Flux.1 and SD3 blocks share the text-stream modules ConceptAttention runs concepts
through: ``norm1_context`` (AdaLayerNormZero), ``attn.add_{q,k,v}_proj`` (+ optional
``norm_added_{q,k}``), ``attn.to_add_out``, ``norm2_context`` and ``ff_context``. This module
holds that path once, as the defaults of a :class:`JointPath`; a backend gives its processor
(the stock joint attention, mirrored op for op), its concept conditioning and only the modules
that differ. After the last dual-stream block the same concept residual continues through the
single-stream blocks (shared weights), whose modules a :class:`SinglePath` names (defaults: the
Flux-family single block's).

It also holds the parts several backends compose (no backend imports another): the Flux-family
joint and single-stream attention (``FluxStyleProcessor``, ``FluxStyleSingleProcessor``),
position-id geometry, the dead-last-block and default-layer rules, and the packed-latent encode
forward.

Per block and traced forward, data flows one way through a :class:`BlockPass`:
pre-hook (modulate and project concepts) -> processor (concept attention, saliency) -> post-hook
(residual update with the block's own weights).
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
    BlockKind,
    BlockRecord,
    CallArguments,
    Conditioning,
    ForwardRecord,
    LayerRule,
    RunState,
    StopForward,
    TensorFacts,
    attention_processors,
    last_blocks,
    set_attention_processors,
)
from conceptattention.concepts import CaptionSequences, ConceptEmbeddings
from conceptattention.core import TokenGrid, block_saliency, concept_attention
from conceptattention.errors import ConceptAttentionError


@dataclass
class BlockPass:
    """One block's concept data, handed from the pre-hook to the processor to the post-hook.

    Attributes:
        index: the block's run index (double-stream block i is i, single-stream block j is ``num_double + j``).
        normed: (B, C, D_model) the concept tokens after the block's norm and modulation.
        qkv: (B, C, H * D) concept queries, keys and values from the block's text-stream (or shared) projections,
            before QK-norm and RoPE.
        modulation: what the block's residual update needs besides the attention output (its gates, shifts and
            scales; single-stream blocks: also the parallel MLP branch).
        attention_out: (B, C, H * D) the concepts' attention output before the output projection, set by the
            processor (None until the block's attention has run).
    """

    index: int
    normed: torch.Tensor
    qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    modulation: tuple[torch.Tensor, ...]
    attention_out: torch.Tensor | None = None


def clip_half(x: torch.Tensor) -> torch.Tensor:
    """The blocks' float16 overflow guard: clip to the finite float16 range (other dtypes untouched)."""
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


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
class SequentialBlockOps:
    """The modules concept tokens go through in a block whose attention residual is followed by its feed-forward
    residual (the text stream of a dual-stream block; Z-Image's single-stream blocks), resolved once at install.

    Attributes:
        modulate: ``(concepts (B, C, D), emb) -> (normed (B, C, D), *modulation)``, the block's (text-stream) norm and
            modulation; ``modulation`` is what ``update`` needs (gates, shifts, scales).
        attention: the text-stream (or shared) attention weights; ``out`` is everything between the attention
            output and the gated residual (output projection, and a post-norm where the block has one).
        update: ``(concepts, projected attention output, modulation) -> concepts`` the block's residual updates.
        kind: ``"double"`` (a dual-stream block's text stream) or ``"single"`` (shared weights).
    """

    modulate: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]
    attention: TextAttention
    update: Callable[[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]], torch.Tensor]
    kind: BlockKind = "double"

    @property
    def norm_q(self) -> Any:
        return self.attention.norm_q

    @property
    def norm_k(self) -> Any:
        return self.attention.norm_k

    def begin(self, index: int, concepts: torch.Tensor, emb: torch.Tensor) -> BlockPass:
        """Modulate and project (B, C, D) concepts for the block's attention."""
        normed, *modulation = self.modulate(concepts, emb)
        return BlockPass(index, normed, self.attention.qkv(normed), tuple(modulation))

    def finish(self, concepts: torch.Tensor, step: BlockPass) -> torch.Tensor:
        """The block's residual updates of (B, C, D) concepts from the attention output."""
        assert step.attention_out is not None
        return self.update(concepts, self.attention.out(step.attention_out), step.modulation)


def gated_text_update(
    norm: Callable[[torch.Tensor], torch.Tensor],
    feedforward: Callable[[torch.Tensor], torch.Tensor],
    concepts: torch.Tensor,
    attention: torch.Tensor,
    modulation: tuple[torch.Tensor, ...],
) -> torch.Tensor:
    """A dual-stream block's text-stream residuals: the gated attention output, then the gated feed-forward of the
    shifted and scaled norm, as the text stream's (B, D) ``(gate_msa, shift_mlp, scale_mlp, gate_mlp)``."""
    gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
    concepts = concepts + gate_msa.unsqueeze(1) * attention
    normed = norm(concepts) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    return clip_half(concepts + gate_mlp.unsqueeze(1) * feedforward(normed))


@dataclass(frozen=True)
class ParallelBlockOps:
    """The modules concept tokens go through in one parallel single-stream block (the Flux family's: attention and
    MLP from one input, one gated projection of both).

    Attributes:
        modulate: ``(concepts (B, C, D), emb) -> (normed, gate (B, D))``, the block's norm and modulation.
        project: ``normed -> (q, k, v, mlp)``: the shared q/k/v projections, each (B, C, H * D), and the parallel
            MLP branch after its activation.
        norm_q, norm_k: the shared per-head QK-norm modules, or None.
        out: ``(attention output, mlp) -> (B, C, D)``, the parallel output projection.
        clip: the block clips float16 outputs to the finite range.
    """

    modulate: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    project: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
    norm_q: Any
    norm_k: Any
    out: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    clip: bool = True
    kind: ClassVar[BlockKind] = "single"

    def begin(self, index: int, concepts: torch.Tensor, emb: torch.Tensor) -> BlockPass:
        normed, gate = self.modulate(concepts, emb)
        q, k, v, mlp = self.project(normed)
        return BlockPass(index, normed, (q, k, v), (gate, mlp))

    def finish(self, concepts: torch.Tensor, step: BlockPass) -> torch.Tensor:
        """``c + gate * out([o_c; mlp])``: the attention and the MLP branch in one gated projection."""
        assert step.attention_out is not None
        gate, mlp = step.modulation
        concepts = concepts + gate.unsqueeze(1) * self.out(step.attention_out, mlp)
        return clip_half(concepts) if self.clip else concepts


BlockOps = SequentialBlockOps | ParallelBlockOps


class JointConceptStream:
    """The concept residual stream of one attachment, through the text-stream weights of dual-stream blocks and
    on through the shared weights of the single-stream blocks that follow them.

    Blocks are addressed by run index: dual-stream block i is i, single-stream block j is ``num_double + j``.

    Args:
        transformer: the traced transformer.
        state: the session's run state.
        path: the backend's text path (concept embedding, conditioning, the block modules).
    """

    def __init__(self, transformer: Any, state: RunState, path: JointPath) -> None:
        self.transformer = transformer
        self.state = state
        self.path = path
        self.hidden: torch.Tensor | None = None  # (B_rows, C, D_model)
        self.temb: torch.Tensor | None = None  # the forward's concept conditioning (None: per block only)
        self.image_tokens = 0  # image tokens of the current forward (reference images included)
        self.current: BlockPass | None = None
        self.ops: list[BlockOps] = []  # per run index 0..last selected, resolved at install
        self._rotary: dict[torch.device, Callable[[torch.Tensor], torch.Tensor] | None] = {}
        self._embedding: tuple[tuple[int, torch.device, torch.dtype], torch.Tensor] | None = None

    def install(
        self,
        stack: contextlib.ExitStack,
        blocks: torch.nn.ModuleList,
        originals: dict[str, Any],
        processor: type,
        ops_of: Callable[[Any], BlockOps],
    ) -> None:
        """Replace the processors of blocks 0..k of one kind (``originals``, in block order) with ``processor`` and hook
        those blocks; they take the next run indices (dual-stream blocks first, then single-stream ones).

        Args:
            processor: the installed processor class, built as ``processor(run index, stream, original)``.
            ops_of: ``block -> BlockOps``, the modules the concepts go through in that block.
        """
        offset = len(self.ops)
        if not originals:
            return
        installed = {name: processor(offset + j, self, old) for j, (name, old) in enumerate(originals.items())}
        set_attention_processors(self.transformer, installed)
        for j in range(len(originals)):
            self._hook(stack, blocks[j], offset + j, ops_of(blocks[j]))

    def _hook(self, stack: contextlib.ExitStack, block: torch.nn.Module, index: int, ops: BlockOps) -> None:
        assert index == len(self.ops)
        self.ops.append(ops)
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

        Args:
            hidden_states: (B, S, D) the first block's hidden states (a dual-stream block's image stream).
        """
        context = self.state.forward
        assert context is not None
        record = context.record
        dtype, device = hidden_states.dtype, hidden_states.device
        self.image_tokens = hidden_states.shape[1]  # the first dual-stream block's image stream
        rows = len(range(*record.rows.indices(hidden_states.shape[0])))
        path = self.path
        concepts = self._embedded(record, device, dtype)  # (C | B_rows, C, D)
        self.hidden = (concepts if concepts.ndim == 3 else concepts.unsqueeze(0)).expand(rows, -1, -1)  # (B_rows, C, D)
        forward = path.forward_conditioning
        self.temb = None if forward is None else forward(self.transformer, record, dtype)

    def _embedded(self, record: ForwardRecord, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The concept tokens entering the first block; kept for the run where the path says they do not depend on
        the forward (a caption refiner without timestep input), so they are computed once per pipeline call."""
        path = self.path
        key = (self.state.run, device, dtype)
        if not path.embedding_per_forward and self._embedding is not None and self._embedding[0] == key:
            return self._embedding[1]
        concepts = path.embed(self.transformer, path.concept_inputs(self.state.concepts, device, dtype), record)
        if not path.embedding_per_forward:
            self._embedding = (key, concepts)
        return concepts

    def _conditioning(self, ops: BlockOps, arguments: CallArguments) -> torch.Tensor:
        context = self.state.forward
        assert context is not None
        per_block = self.path.block_conditioning
        if ops.kind == "single":
            assert self.path.single is not None
            per_block = self.path.single.block_conditioning or per_block
        if per_block is None:
            assert self.temb is not None, "a path without per-block conditioning gives `forward_conditioning`"
            return self.temb
        return per_block(context.record, arguments)

    def _pre_hook(self, index: int):
        @torch.no_grad()  # the concept stream is never differentiated (checkpointed or grad-enabled forwards)
        def pre_hook(block, args, kwargs):
            if not self.runs(index):
                return None
            arguments = CallArguments(block, args, kwargs)
            if index == 0 or self.hidden is None:
                self._start(arguments[self.path.hidden_argument])
            assert self.hidden is not None
            ops = self.ops[index]
            self.current = ops.begin(index, self.hidden, self._conditioning(ops, arguments))
            return None

        return pre_hook

    def _post_hook(self, index: int):
        @torch.no_grad()
        def post_hook(block, args, kwargs, output):
            if not self.runs(index):
                return None
            step, self.current = self.current, None
            assert step is not None and step.index == index and step.attention_out is not None
            assert self.hidden is not None
            self.hidden = concepts = self.ops[index].finish(self.hidden, step)
            state = self.state
            if state.observers:
                kind, within = state.blocks.kind_of(index)
                record = BlockRecord(within, concepts, kind)
                for observe in state.observers:
                    observe(record)
            if index == state.last_block and state.stop_after_last_block:
                raise StopForward
            return None

        return post_hook

    # -- called by the processors ------------------------------------------------------------------
    def concept_rope(self, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The rotation of (B, C, H, D) concept q/k at the path's concept positions with the model's own RoPE
        (``JointPath.rotation``), built once per device (the positions are fixed for an attachment); None: none."""
        if device not in self._rotary:
            ids = self.path.concept_positions(self.state.concepts, device)
            self._rotary[device] = None if ids is None else self.path.rotation(self.transformer, ids)
        return self._rotary[device]

    def image_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """The image tokens of a single-stream block's (B, S, ...) joint sequence, (B, N, ...): where the forward's
        record says (a slice, or per-row (B, N) indices where items place them differently), else the last ones
        ([text; image])."""
        context = self.state.forward
        assert context is not None
        image = context.record.image
        if image is None:
            return tensor[:, tensor.shape[1] - self.image_tokens :]
        if isinstance(image, slice):
            return tensor[:, image]
        return tensor[torch.arange(tensor.shape[0], device=tensor.device)[:, None], image]

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
            index: the block's run index (its ops, resolved at install, and the pre-hook's projections).
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
        ops = self.ops[index]
        q_c, k_c, v_c = step.qkv
        heads = (q_x.shape[1], q_x.shape[-1])  # (H, D)
        q_c = apply_norm(ops.norm_q, q_c.unflatten(-1, heads))  # (B, C, H, D)
        k_c = apply_norm(ops.norm_k, k_c.unflatten(-1, heads))
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
        step.attention_out = o_c  # the block's residual update uses it in the post-hook


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


def stock_processors(
    spec: BackendSpec,
    transformer: Any,
    indices: Sequence[int],
    blocks: str | None = None,
    classes: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """The processors of the blocks to trace, after checking each is a stock one we replace.

    Args:
        blocks, classes: the block list attribute and its stock processor classes (default: the dual-stream ones).
    """
    blocks = blocks or spec.double_blocks
    classes = classes or spec.processor_classes
    originals = attention_processors(transformer)
    found = {}
    for index in indices:
        name = f"{blocks}.{index}.{spec.attention}.processor"
        processor = originals[name]
        if type(processor).__name__ not in classes:
            stock = " or ".join(classes)
            raise ConceptAttentionError(
                f"`{name}` is a {type(processor).__name__}; ConceptAttention replaces only the stock {stock} "
                "(IP-Adapter, fused-projection and custom processors are not supported). Restore it with "
                f"`transformer.set_attn_processor({classes[0]}())`, unload the adapter or "
                "call `unfuse_qkv_projections()` first."
            )
        found[name] = processor
    return found


def no_concept_positions(concepts: ConceptEmbeddings, device: torch.device) -> torch.Tensor | None:
    return None


def real_rotation(transformer: Any, ids: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The rotation of (B, C, H, D) q/k at (C, axes) position ids with the model's ``pos_embed`` (a (cos, sin) pair)
    and diffusers' ``apply_rotary_emb``, as the Flux-family processors rotate text and image tokens."""
    rotary = transformer.pos_embed(ids)  # (C, D) cos, sin

    def rotate(x: torch.Tensor) -> torch.Tensor:
        return apply_rotary_emb(x, rotary, sequence_dim=1)  # type: ignore[arg-type,return-value]

    return rotate


def single_norm(block: Any, concepts: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The block's ``norm`` (AdaLayerNormZeroSingle and its pruned Chroma form) on (B, C, D) concepts: normed and
    the (B, D) gate."""
    return block.norm(concepts, emb=emb)


def parallel_branches(block: Any, normed: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Shared ``attn.to_{q,k,v}`` (or the fused ``to_qkv``) and the MLP branch ``act_mlp(proj_mlp(normed))``."""
    q, k, v = projections(block.attn, normed, added=False)
    return q, k, v, block.act_mlp(block.proj_mlp(normed))


def parallel_out(block: Any, attention_out: torch.Tensor, mlp: torch.Tensor) -> torch.Tensor:
    """The parallel output projection ``proj_out([attention; mlp])``."""
    return block.proj_out(torch.cat([attention_out, mlp], dim=2))


def shared_qk_norms(block: Any) -> tuple[Any, Any]:
    return block.attn.norm_q, block.attn.norm_k


@dataclass(frozen=True)
class SinglePath(Generic[Conditioning]):
    """The concept stream through single-stream blocks (text and image share every weight), as parts.

    The defaults are the Flux-family single block's (``norm``, ``attn.to_{q,k,v}``, ``proj_mlp`` / ``act_mlp``,
    ``proj_out``); a backend gives only what differs.

    Attributes:
        processor: the installed processor class, built as ``processor(run index, stream, original)``.
        block_conditioning: ``(record, block call arguments) -> emb`` where the conditioning is read per block;
            None: the dual-stream blocks' concept conditioning (the path's).
        modulation: ``(block, (B, C, D) concepts, emb) -> (normed, gate (B, D))``.
        branches: ``(block, normed) -> (q, k, v, mlp)``: shared projections and the MLP branch.
        out: ``(block, attention output, mlp) -> (B, C, D)``: the gated update's projection.
        qk_norms: ``block -> (norm_q, norm_k)``.
        clip: the block clips float16 outputs (Flux family) or not (HunyuanVideo).
    """

    processor: type
    block_conditioning: Callable[[ForwardRecord[Conditioning], CallArguments], torch.Tensor] | None = None
    modulation: Callable[[Any, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] = single_norm
    branches: Callable[[Any, torch.Tensor], tuple[torch.Tensor, ...]] = parallel_branches
    out: Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor] = parallel_out
    qk_norms: Callable[[Any], tuple[Any, Any]] = shared_qk_norms
    clip: bool = True

    def ops(self, block: Any) -> ParallelBlockOps:
        """The block's modules, resolved once at install."""
        norm_q, norm_k = self.qk_norms(block)
        return ParallelBlockOps(
            functools.partial(self.modulation, block),
            functools.partial(self.branches, block),  # type: ignore[arg-type]
            norm_q,
            norm_k,
            functools.partial(self.out, block),
            self.clip,
        )


def pre_norm_feedforward_update(
    block: Any, concepts: torch.Tensor, attention: torch.Tensor, mod: tuple[torch.Tensor, ...]
) -> torch.Tensor:
    """The residuals of single-stream layers with pre- and post-norms around a gated feed-forward (Z-Image's
    ``ZImageTransformerBlock``, Lumina-2's ``Lumina2TransformerBlock``: ``ffn_norm1``, ``feed_forward``, ``ffn_norm2``):
    ``c + g_a * attention``, then ``c + g_m * ffn_norm2(ff(ffn_norm1(c) * scale_m))``, with (B, 1, D) ``mod`` =
    (g_a, scale_m, g_m) as the block applies them."""
    gate_msa, scale_mlp, gate_mlp = mod
    concepts = concepts + gate_msa * attention
    return concepts + gate_mlp * block.ffn_norm2(block.feed_forward(block.ffn_norm1(concepts) * scale_mlp))


def caption_sequences(concepts: ConceptEmbeddings, device: torch.device, dtype: torch.dtype) -> CaptionSequences:
    """Each concept's whole templated caption (its ``extras``) on the forward's device and dtype, for a refiner."""
    extras = concepts.extras
    if not isinstance(extras, CaptionSequences):
        raise ConceptAttentionError(
            "These concepts were not encoded as whole captions, which this model's caption refiner needs; encode them "
            "with the backend's own concept encoder"
        )
    return extras.to(device, dtype)


def rope_table_pixels(pipe: Any, pixels_per_token: int) -> int:
    """The largest image side a model with a learned-length RoPE table (``config.axes_lens``: caption / frame, rows,
    columns) takes: its rows or columns of patches, whichever is fewer, in pixels."""
    lens = pipe.transformer.config.axes_lens
    return min(int(lens[1]), int(lens[2])) * pixels_per_token


@dataclass(frozen=True)
class SequentialPath(Generic[Conditioning]):
    """The concept stream through single-stream blocks whose attention residual is followed by a feed-forward
    residual (Z-Image, Lumina-2: no parallel MLP branch), as parts.

    Attributes:
        processor: the installed processor class, built as ``processor(run index, stream, original)``.
        block_conditioning: ``(record, block call arguments) -> emb`` read per block; None: the path's own
            (``JointPath.block_conditioning`` or ``forward_conditioning``).
        modulation: ``(block, (B, C, D) concepts, emb) -> (normed, *modulation)``.
        attention: ``block -> TextAttention``, the shared attention weights (``out``: up to the gated residual).
        update: ``(block, concepts, projected attention output, modulation) -> concepts``, the block's residuals.
    """

    processor: type
    modulation: Callable[[Any, torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]
    attention: Callable[[Any], TextAttention]
    update: Callable[[Any, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]], torch.Tensor]
    block_conditioning: Callable[[ForwardRecord[Conditioning], CallArguments], torch.Tensor] | None = None

    def ops(self, block: Any) -> SequentialBlockOps:
        """The block's modules, resolved once at install."""
        modulate, update = functools.partial(self.modulation, block), functools.partial(self.update, block)
        return SequentialBlockOps(modulate, self.attention(block), update, "single")


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
        concept_positions: ``(concepts, device) -> (C, axes)`` the concepts' text position ids for the model's
            RoPE; None: no rotation (text position ids 0, where RoPE is the identity, or no RoPE on text).
        rotation: ``(transformer, ids) -> rotate`` the model's own RoPE at those ids, for (B, C, H, D) q/k.
        single: the path through the single-stream blocks after the dual-stream ones (None: not traced); for a
            model made only of single-stream layers, its only path.
        hidden_argument: the blocks' hidden-state argument (read at the first traced block).
        embedding_per_forward: ``embed`` depends on the forward (a timestep-conditioned refiner, say); False: the
            concept tokens are computed at a run's first traced forward and reused for the rest of the run.
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
    concept_positions: Callable[[ConceptEmbeddings, torch.device], torch.Tensor | None] = no_concept_positions
    rotation: Callable[[Any, torch.Tensor], Callable[[torch.Tensor], torch.Tensor]] = real_rotation
    single: SinglePath | SequentialPath | None = None
    hidden_argument: str = "hidden_states"
    embedding_per_forward: bool = True
    check: Callable[[Any, RunState], None] = no_install_check

    def __post_init__(self) -> None:
        if (self.forward_conditioning is None) == (self.block_conditioning is None):
            raise TypeError("give exactly one of `forward_conditioning` and `block_conditioning`")

    def install(self, backend: Backend, transformer: Any, state: RunState, stack: contextlib.ExitStack) -> None:
        self.check(transformer, state)
        spec = backend.spec
        num_double = backend.num_blocks(transformer)
        last = state.last_block
        originals = stock_processors(spec, transformer, range(min(last, num_double - 1) + 1)) if num_double else {}
        single = self.single
        single_originals = {}
        if last >= num_double:
            assert single is not None and spec.single_blocks is not None, "single blocks selected; the backend has none"
            count = last - num_double + 1
            single_originals = stock_processors(
                spec, transformer, range(count), spec.single_blocks, spec.single_processor_classes
            )
        stream = JointConceptStream(transformer, state, self)
        double_ops = functools.partial(self.ops, attention=spec.attention)
        stream.install(stack, backend.blocks(transformer), originals, self.processor, double_ops)
        if single_originals:
            assert single is not None
            blocks = backend.single_blocks(transformer)
            assert blocks is not None
            stream.install(stack, blocks, single_originals, single.processor, single.ops)

    def ops(self, block: Any, attention: str) -> SequentialBlockOps:
        """A dual-stream block's text-stream modules (``attention``: the block's attention attribute), resolved once
        at install."""
        norm, feedforward = self.feedforward(block)
        text_attention = self.attention(getattr(block, attention))
        update = functools.partial(gated_text_update, norm, feedforward)
        return SequentialBlockOps(functools.partial(self.modulation, block), text_attention, update, "double")


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
    set ``contiguous_outputs = False`` (they project without ``.contiguous()``); backends whose text
    carries real positions give the concepts' position ids (``JointPath.concept_positions``), rotated
    with the model's own ``pos_embed``. The image and text outputs are computed with the same
    operations, in the same order, as the stock processor (on the user's attention backend), so they
    are bit-identical to an untraced run. Returns exactly the two tensors the stock processor returns.
    """

    contiguous_outputs: ClassVar[bool] = True  # FluxAttnProcessor makes the outputs contiguous before projecting

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
            rope = self.stream.concept_rope(image_out.device) if image_rotary_emb is not None else None
            self.stream.concept_rows(self.block_index, q_x, k_x, v_x, image_out, rope)
        return self.output_projections(attn, image_out, text_out)

    def output_projections(self, attn: Any, image_out: torch.Tensor, text_out: torch.Tensor):
        """The stock processor's output projections."""
        if self.contiguous_outputs:
            image_out, text_out = image_out.contiguous(), text_out.contiguous()
        image_out = attn.to_out[0](image_out)
        image_out = attn.to_out[1](image_out)
        text_out = attn.to_add_out(text_out)
        return image_out, text_out


class FluxStyleSingleProcessor(ConceptProcessor):
    """The stock attention of Flux-family single-stream blocks (``FluxAttnProcessor`` and
    ``LongCatImageAttnProcessor`` without a text stream) plus the concept rows of one block.

    The shared q/k/v over the block's [text; image] sequence, QK-norm, RoPE and attention are the
    stock operations in the stock order; the output (before the block's parallel projection) is
    returned unchanged, so the block's outputs are bit-identical to an untraced run.
    """

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        assert encoder_hidden_states is None  # single blocks pass one [text; image] sequence
        query, key, value = projections(attn, hidden_states, added=False)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))  # (B, S, H, D)
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        return self.shared_attention(query, key, value, attention_mask, image_rotary_emb)

    def shared_attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        """RoPE and attention over a [text; image] sequence's (B, S, H, D) QK-normed q/k/v, as the stock
        processors, plus the block's concept rows; returns the (B, S, H * D) output before any projection."""
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)  # type: ignore[arg-type,assignment]
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)  # type: ignore[arg-type,assignment]
        out = self.joint_attention(query, key, value, attention_mask)  # (B, S, H * D)
        if self.stream.runs(self.block_index):
            q_x, k_x, v_x = (self.stream.image_rows(t).transpose(1, 2) for t in (query, key, value))  # (B, H, N, D)
            rope = self.stream.concept_rope(out.device) if image_rotary_emb is not None else None
            self.stream.concept_rows(self.block_index, q_x, k_x, v_x, self.stream.image_rows(out), rope)
        return out


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
