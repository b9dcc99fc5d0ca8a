"""The energon task encoder: raw shard samples -> planned documents -> packs -> micro-batches.

Energon runs these hooks, in this order, inside each data-loader worker (see
``megatron.energon.TaskEncoder``); everything here is a deterministic function of its input, which is
what lets energon save the pipeline's position and restore it exactly (samples in its buffers are
re-created from their restore keys, not pickled):

1. cooker (``raw_shard_sample``): energon's ``CrudeWebdataset`` hands out the tar members of one sample
   as bytes (``decoder = None``: no energon decoding); kept as they are.
2. :meth:`PackingTaskEncoder.preencode_sample` *plans* a document: it encodes the sample with its media
   only sized, not decoded (``encode_shard_parts(decode_media=False)``: JSON, tokens, positions; an
   image's size, a video's frame count, frame rate and size from their shard records, its frames'
   timestamps from a demux of its container), applies the over-long policy
   (:func:`fit_sample`), and keeps only the sizes and the raw bytes. So the packing buffer holds hundreds
   of samples at the cost of their compressed bytes, not their float32 patches (which is what makes ~99%
   packing fill affordable), and media are decoded once, when realised. A sample that fails to encode
   becomes a *skip record*: it is logged (source, shard, key, reason) and travels on as a zero-token
   document, so the count of skipped samples reaches the trainer and survives save/restore exactly.
3. :meth:`select_samples_to_pack` groups a full buffer with :func:`first_fit_decreasing` (token
   capacity ``seq_length``, patch capacity ``max_visual_patches``); every sample of the buffer ends up
   in a pack (energon drops what the pre-packer leaves out).
4. :meth:`postencode_sample` encodes the members of the pack about to be emitted, media decoded,
   re-applying the same truncation, and checks the result against the plan. A medium whose pixels do
   not decode (shards are validated when built, so rarely) becomes a skip record here, with its reason;
   its place in the pack stays empty.
5. :meth:`pack_selected_samples` concatenates them (:func:`pack_documents`).
6. :meth:`batch` stacks ``micro_batch_size`` packs (:func:`collate_micro_batch`) and adds the
   per-token ``loss_weights`` of the stage's loss normalisation.

Sample failures never raise out of the pipeline; bugs (``SystemError``, ``NameError``, ...) do.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from megatron.energon import Cooker, CrudeSample, Sample, SkipSample, TaskEncoder, basic_sample_keys, stateless
from megatron.energon.edataclass import edataclass
from megatron.energon.errors import SYSTEM_EXCEPTIONS

from pretrain.data.encoding import SampleEncoder, encode_shard_parts
from pretrain.data.loss_weights import LOSS_NORMALIZATIONS, token_loss_weights
from pretrain.data.micro_batch import collate_micro_batch
from pretrain.data.packing import PackedSequence, PackingConfig, first_fit_decreasing, fit_sample, pack_documents

logger = logging.getLogger("pretrain.data")


@stateless
def raw_shard_sample(sample: CrudeSample) -> CrudeSample:
    """Cooker of every data_tools shard set: the tar members as bytes, unchanged."""
    return sample


def skip_record(source: str, shard: str, key: str, reason: str, detail: str) -> dict:
    """What the trainer learns about a skipped sample (a plain dict: it crosses process boundaries)."""
    return {"source": source, "shard": shard, "key": key, "reason": reason, "detail": detail}


@edataclass
class PlannedDocument(Sample):
    """A sample in the packing buffer: its sizes and raw bytes, or a skip record.

    parts: the sample's tar members (part name -> bytes); num_tokens / num_patches: its size after the
    over-long policy; keep_tokens: the truncated length (None when not truncated); skip: the skip record
    of a sample that could not be used (then num_tokens = num_patches = 0).
    """

    source: str
    shard: str
    parts: dict
    num_tokens: int
    num_patches: int
    keep_tokens: int | None = None
    skip: dict | None = None


@edataclass
class RealisedDocument(Sample):
    """A pack member after re-encoding: the :class:`EncodedSample` (None when skipped)."""

    source: str
    shard: str
    sample: Any
    truncated: bool
    skip: dict | None = None


@edataclass
class PackItem(Sample):
    """One packed sequence plus the skip records and truncation count of its members."""

    pack: PackedSequence
    skipped: list
    num_truncated: int


def _reason(err: Exception) -> str:
    """Short code of a sample failure: the encoder's / media module's ``reason``, else by type."""
    from data_tools.schema import SchemaError

    reason = getattr(err, "reason", None)
    if reason:
        return str(reason)
    return "schema_error" if isinstance(err, SchemaError) else "invalid_sample"


def _log_skip(record: dict) -> None:
    logger.warning("skipped sample %s of shard %s (source %s): %s: %s",
                   record["key"], record["shard"], record["source"], record["reason"], record["detail"])


class PackingTaskEncoder(TaskEncoder):
    """Encodes data_tools shard samples and packs them into micro-batches (see module docstring).

    encoder: the :class:`SampleEncoder` (tokenizer + vision settings); packing: the pack geometry and
    over-long policy; pad_id: padding token and label filler; loss_normalization: "token" | "sample" |
    "square_root" (the ``loss_weights`` of each micro-batch); seed: mixes the order in which the packs
    of one buffer are emitted.
    """

    decoder = None  # the members stay bytes: media are decoded by common.media.decode only
    cookers = (Cooker(raw_shard_sample),)

    def __init__(
        self,
        encoder: SampleEncoder,
        packing: PackingConfig,
        *,
        pad_id: int,
        loss_normalization: str = "token",
        seed: int = 0,
    ):
        if loss_normalization not in LOSS_NORMALIZATIONS:
            raise ValueError(
                f"loss_normalization must be one of {sorted(LOSS_NORMALIZATIONS)}, got {loss_normalization!r}"
            )
        self.encoder = encoder
        self.packing = packing
        self.pad_id = pad_id
        self.loss_normalization = loss_normalization
        self.seed = seed

    # ------------------------------------------------------------------------------------ helpers
    def _encode(self, parts: dict, decode_media: bool):
        """The sample, after the over-long policy; raises for a bad sample (ValueError family)."""
        sample = encode_shard_parts(self.encoder, parts, decode_media=decode_media)
        return sample, fit_sample(sample, self.packing)

    def _skipped(self, base: dict, source: str, shard: str, reason: str, detail: str) -> PlannedDocument:
        record = skip_record(source, shard, base.get("__key__", "?"), reason, detail)
        _log_skip(record)
        return PlannedDocument(**base, source=source, shard=shard, parts={}, num_tokens=0, num_patches=0, skip=record)

    @staticmethod
    def _realised(planned: PlannedDocument, sample=None, skip: dict | None = None) -> RealisedDocument:
        return RealisedDocument.derive_from(
            planned, source=planned.source, shard=planned.shard, sample=sample,
            truncated=sample is not None and planned.keep_tokens is not None, skip=skip,
        )

    # ------------------------------------------------------------------------------ energon hooks
    @stateless
    def preencode_sample(self, sample: CrudeSample) -> PlannedDocument:
        base = basic_sample_keys(sample)
        source = (sample.get("__subflavors__") or {}).get("source", "?")
        sources = sample.get("__sources__") or ()
        shard = sources[0].shard_name if sources else "?"
        parts = {k: v for k, v in sample.items() if not k.startswith("__")}
        try:
            encoded, fit = self._encode(parts, decode_media=False)
        except SYSTEM_EXCEPTIONS:
            raise
        except Exception as err:  # one bad sample must never stop training
            return self._skipped(base, source, shard, _reason(err), f"{type(err).__name__}: {err}")
        if fit.sample is None:
            detail = (
                f"{encoded.num_tokens} tokens, {encoded.num_image_patches + encoded.num_video_patches} patches; "
                f"pack holds {self.packing.seq_length} tokens, {self.packing.max_visual_patches} patches"
            )
            return self._skipped(base, source, shard, fit.reason or "too_long", detail)
        kept = fit.sample
        return PlannedDocument(
            **base,
            source=source,
            shard=shard,
            parts=parts,
            num_tokens=kept.num_tokens,
            num_patches=kept.num_image_patches + kept.num_video_patches,
            keep_tokens=kept.num_tokens if fit.action == "truncated" else None,
        )

    def select_samples_to_pack(self, samples: list[PlannedDocument]) -> list[list[PlannedDocument]]:
        bins = first_fit_decreasing(
            [s.num_tokens for s in samples],
            [s.num_patches for s in samples],
            self.packing.seq_length,
            self.packing.max_visual_patches,
        )
        # First-fit decreasing opens bins from the largest samples down; emit them in an order that is
        # pseudo-random but a pure function of their members (so a restored run emits the same order).
        def order(members: list[int]) -> bytes:
            keys = ",".join(str(samples[i].__key__) + "@" + samples[i].source for i in members)
            return hashlib.sha256(f"{self.seed}|{keys}".encode()).digest()

        bins.sort(key=order)
        return [[samples[i] for i in members] for members in bins]

    @stateless
    def postencode_sample(self, planned: PlannedDocument) -> RealisedDocument:
        if planned.skip is not None:
            return self._realised(planned, skip=planned.skip)
        try:
            _, fit = self._encode(planned.parts, decode_media=True)
        except SYSTEM_EXCEPTIONS:
            raise
        except Exception as err:  # e.g. pixels that do not decode
            return self._realise_failed(planned, _reason(err), f"{type(err).__name__}: {err}")
        got = None if fit.sample is None else (fit.sample.num_tokens,
                                               fit.sample.num_image_patches + fit.sample.num_video_patches)
        if got != (planned.num_tokens, planned.num_patches):
            return self._realise_failed(planned, "realise_failed", f"decoded, the sample has (tokens, patches) "
                                        f"{got}, the plan had {(planned.num_tokens, planned.num_patches)} "
                                        "(its media differ from their record)")
        return self._realised(planned, sample=fit.sample)

    def _realise_failed(self, planned: PlannedDocument, reason: str, detail: str) -> RealisedDocument:
        record = skip_record(planned.source, planned.shard, str(planned.__key__), reason, detail)
        _log_skip(record)
        return self._realised(planned, skip=record)

    @stateless
    def pack_selected_samples(self, samples: list[RealisedDocument]) -> PackItem:
        documents = [d for d in samples if d.sample is not None]
        vision = self.encoder.config.vision
        pack = pack_documents(
            [d.sample for d in documents],
            self.packing.seq_length,
            self.pad_id,
            sources=[d.source for d in documents],
            patch_dim=vision.patch_dim,
            doc_ids=[f"{d.source}/{d.shard}/{d.__key__}" for d in documents],
        )
        return PackItem(
            __key__=",".join(str(d.__key__) for d in samples),
            __restore_key__=(),
            pack=pack,
            skipped=[d.skip for d in samples if d.skip is not None],
            num_truncated=sum(1 for d in documents if d.truncated),
        )

    @stateless
    def batch(self, packs: list[PackItem]) -> dict:
        if not packs:
            raise SkipSample()
        batch = collate_micro_batch(
            [p.pack for p in packs],
            skipped=[record for p in packs for record in p.skipped],
            num_truncated=sum(p.num_truncated for p in packs),
        )
        batch["loss_weights"] = token_loss_weights(batch["loss_mask"], batch["document_ids"], self.loss_normalization)
        return batch
