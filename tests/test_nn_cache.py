import hashlib

import pytest
import torch

from vidgen.nn import CacheSpec, KVCache

SPEC = CacheSpec(layers=2, kv_heads=2, head_dim=4, tokens_per_frame=3, window=6, max_streams=3)


def clip_kv(frames: int, batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (SPEC.layers, batch, SPEC.kv_heads, frames, SPEC.tokens_per_frame, SPEC.head_dim)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def logical(cache: KVCache, stream: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stream's cached K, V in time order (l, h, t, n, d), and their frame indices."""
    frames = cache.frame_index[stream]
    order = [int(i) for i in torch.argsort(frames) if frames[i] >= 0]
    return cache.k[:, stream][:, :, order], cache.v[:, stream][:, :, order], frames[order]


def digest(cache: KVCache) -> str:
    h = hashlib.sha256()
    for t in (cache.k, cache.v, cache.frame_index):
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def test_holds_exactly_the_last_window_for_streams_of_different_ages():
    cache = KVCache(SPEC)
    history: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    a = cache.add_stream()
    for step in range(7):
        if step == 2:
            b = cache.add_stream()  # joins later: shorter cache
        streams = [a, b] if step >= 2 else [a]
        k, v = clip_kv(2, batch=len(streams), seed=step)
        cache.append(streams, k, v)
        for i, s in enumerate(streams):
            history.setdefault(s, []).append((k[:, i], v[:, i]))
        for s in streams:
            full_k = torch.cat([kk for kk, _ in history[s]], dim=2)  # uncached concatenation
            full_v = torch.cat([vv for _, vv in history[s]], dim=2)
            held = min(full_k.shape[2], SPEC.window)
            got_k, got_v, frames = logical(cache, s)
            assert cache.length(s) == held
            assert torch.equal(got_k, full_k[:, :, -held:])
            assert torch.equal(got_v, full_v[:, :, -held:])
            assert frames.tolist() == list(range(full_k.shape[2] - held, full_k.shape[2]))


def test_whole_clips_are_evicted():
    cache = KVCache(SPEC)
    s = cache.add_stream()
    for frames in (2, 3):
        cache.append([s], *clip_kv(frames))
    assert cache.length(s) == 5
    cache.append([s], *clip_kv(2))  # needs 2 free slots: evicts the whole first clip (2)
    assert cache.length(s) == 5 and cache.window_start(s) == 2
    cache.append([s], *clip_kv(3))  # evicts the 3-frame clip, not just 2 of its frames
    assert cache.length(s) == 5 and cache.window_start(s) == 5
    _, _, frames = logical(cache, s)
    assert frames.tolist() == [5, 6, 7, 8, 9]


def test_reading_never_mutates():
    cache = KVCache(SPEC)
    s0, s1 = cache.add_stream(), cache.add_stream()
    cache.append([s0, s1], *clip_kv(4, batch=2))
    cache.append([s0], *clip_kv(4, seed=1))
    before = digest(cache)
    for layer in range(SPEC.layers):
        cache.read(layer, [s1, s0])
        cache.read(layer, [s0, s1])
    cache.positions([s0, s1])
    cache.query_positions([s0, s1], 4)
    cache.key_mask([s0, s1])
    cache.snapshot(s0)
    assert digest(cache) == before


def test_positions_masks_and_views():
    cache = KVCache(SPEC)
    s0, s1 = cache.add_stream(), cache.add_stream()
    cache.append([s0, s1], *clip_kv(2, batch=2))
    for i in range(3):
        cache.append([s0], *clip_kv(2, seed=i))  # s0: frames 0..7 made, window holds 2..7
    pos = cache.positions([s0, s1])
    valid = cache.valid([s0, s1])
    # The ring wrapped: slots 0-1 hold frames 6-7, slots 2-5 frames 2-5 (window start 2).
    assert pos.tolist() == [[4, 5, 0, 1, 2, 3], [0, 1, 0, 0, 0, 0]]
    assert valid[0].all() and valid[1].sum() == 2
    assert cache.query_positions([s0, s1], 2).tolist() == [[6, 7], [2, 3]]
    mask = cache.key_mask([s0, s1])
    assert mask.shape == (2, 1, 1, SPEC.window * SPEC.tokens_per_frame)
    assert mask[0].all() and mask[1].sum() == 2 * SPEC.tokens_per_frame
    assert cache.key_mask([s0]) is None  # full caches need no mask: fused kernels
    k, _ = cache.read(0, [s0, s1])
    assert k.shape == (2, SPEC.kv_heads, SPEC.window, SPEC.tokens_per_frame, SPEC.head_dim)
    assert k.data_ptr() == cache.k[0, s0].data_ptr()  # consecutive streams: a view, no copy


def test_reading_streams_out_of_order_keeps_the_order_asked_for():
    """Non-consecutive streams are gathered (a copy): row i must be streams[i]'s K/V."""
    cache = KVCache(SPEC)
    s0, s1, s2 = (cache.add_stream() for _ in range(3))
    cache.append([s0, s1, s2], *clip_kv(2, batch=3))
    cache.append([s2], *clip_kv(2, seed=1))
    for layer in range(SPEC.layers):
        for streams in ([s1, s0], [s2, s0], [s2, s1, s0]):
            k, v = cache.read(layer, streams)
            singles = [cache.read(layer, [s]) for s in streams]
            assert torch.equal(k, torch.cat([sk for sk, _ in singles]))
            assert torch.equal(v, torch.cat([sv for _, sv in singles]))


def test_memory_is_constant_once_the_window_is_full():
    cache = KVCache(SPEC)
    s = cache.add_stream()
    total, per_stream = cache.nbytes, []
    for i in range(8):
        cache.append([s], *clip_kv(2, seed=i))
        per_stream.append(cache.stream_nbytes(s))
        assert cache.nbytes == total == SPEC.nbytes
    assert per_stream[:3] == [SPEC.bytes_per_frame * f for f in (2, 4, 6)]
    assert set(per_stream[2:]) == {SPEC.bytes_per_frame * SPEC.window}


def test_snapshot_and_load_continue_identically():
    a, b = KVCache(SPEC), KVCache(SPEC)
    sa = a.add_stream()
    for i in range(4):
        a.append([sa], *clip_kv(2 + i % 2, seed=i))
    b.add_stream()
    sb = b.add_stream()  # another slot on purpose
    b.load(sb, a.snapshot(sa))
    for i in range(4, 7):
        a.append([sa], *clip_kv(2, seed=i))
        b.append([sb], *clip_kv(2, seed=i))
        for x, y in zip(logical(a, sa), logical(b, sb), strict=True):
            assert torch.equal(x, y)
        assert a.positions([sa]).tolist() == b.positions([sb]).tolist()


def test_add_and_remove_streams():
    cache = KVCache(SPEC)
    s = [cache.add_stream() for _ in range(3)]
    with pytest.raises(RuntimeError, match="all 3 stream slots"):
        cache.add_stream()
    cache.append(s, *clip_kv(2, batch=3))
    cache.remove_stream(s[1])
    assert cache.streams == [s[0], s[2]]
    new = cache.add_stream(first_frame=100)
    assert new == s[1] and cache.length(new) == 0 and not cache.valid([new]).any()
    cache.append([new], *clip_kv(2, seed=9))
    _, _, frames = logical(cache, new)
    assert frames.tolist() == [100, 101]
    with pytest.raises(KeyError, match="not in the cache"):
        cache.read(0, [7])


def test_bad_appends():
    cache = KVCache(SPEC)
    s = cache.add_stream()
    with pytest.raises(ValueError, match="window=6"):
        cache.append([s], *clip_kv(7))
    k, v = clip_kv(2)
    with pytest.raises(ValueError, match="must be"):
        cache.append([s], k[:1], v[:1])
    with pytest.raises(ValueError, match="CacheSpec.window"):
        CacheSpec(layers=1, kv_heads=1, head_dim=4, tokens_per_frame=1, window=0)


def test_a_reused_slot_starts_clean_and_first_frames_are_not_negative():
    """A removed stream's K/V stayed in its slot: a diverged one's NaNs reached the next
    stream there through masked keys (probability 0, but 0 x NaN is NaN)."""
    cache = KVCache(SPEC)
    a = cache.add_stream()
    k, v = clip_kv(2)
    cache.append([a], k * float("nan"), v * float("nan"))
    cache.remove_stream(a)
    b = cache.add_stream()
    assert b == a and not cache.k[:, b].isnan().any() and not cache.v[:, b].isnan().any()
    with pytest.raises(ValueError, match="first_frame must be >= 0"):
        cache.add_stream(first_frame=-1)  # -1 marks an empty slot: its frames never read


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.pop("frame_index"), r"missing \['frame_index'\]"),
        (lambda s: s.update(frame_index=s["frame_index"][:1]), "frame_index must be integer"),
        (lambda s: s.update(k=s["k"].half()), "snapshot k must be torch.float32"),
        (lambda s: s.update(next_frame=torch.tensor(0)), "bookkeeping is inconsistent"),
        (lambda s: s.update(chunks=torch.tensor([[0, 0, 9]])), "does not fit|inconsistent"),
        (lambda s: s.update(head=torch.tensor(7)), "is not where the last chunk"),
        # A head moved inside the window: the next clip overwrote held frames.
        (lambda s: s.update(head=(s["head"] + 1) % 4), "is not where the last chunk"),
        # 2.7 was taken as 2, two numbers failed with torch's message naming no field
        (lambda s: s.update(head=s["head"].double() + 0.7), "head must be one integer"),
        (lambda s: s.update(next_frame=torch.tensor([4, 4])), "next_frame must be one integer"),
        # More chunks than the window holds frames: refused before they are walked
        (lambda s: s.update(chunks=torch.zeros(10**5, 3, dtype=torch.int64)), "more than its"),
    ],
)
def test_a_snapshot_that_does_not_fit_is_refused_naming_what(change, message):
    """Only k and v shapes were checked: a snapshot with a broadcast frame_index, a ring of
    more frames than the window, or positions behind its frames loaded silently."""
    cache = KVCache(SPEC)
    s = cache.add_stream()
    k, v = clip_kv(4)
    cache.append([s], k, v)
    snap = cache.snapshot(s)
    change(snap)
    other = KVCache(SPEC)
    with pytest.raises(ValueError, match=message):
        other.load(other.add_stream(), snap)


def test_a_snapshot_whose_chunks_do_not_follow_each_other_is_refused():
    """Two chunks with a gap of frames between them loaded, and RoPE positions jumped."""
    cache = KVCache(SPEC)
    s = cache.add_stream()
    for seed in (0, 1):
        k, v = clip_kv(2, seed=seed)
        cache.append([s], k, v)
    snap = cache.snapshot(s)
    assert snap["chunks"].shape == (2, 3)
    snap["chunks"] = snap["chunks"] + torch.tensor([[0, 0, 0], [0, 5, 0]])
    snap["frame_index"] = torch.tensor([0, 1, 7, 8, -1, -1])
    snap["next_frame"] = torch.tensor(9)
    other = KVCache(SPEC)
    with pytest.raises(ValueError, match="do not follow each other"):
        other.load(other.add_stream(), snap)


def test_append_keeps_values_not_autograd_history():
    """K/V computed with grad enabled (a model's incremental API outside no_grad) made the
    cache carry their graph: every clip ever appended, evicted ones too, stayed alive."""
    import weakref

    cache = KVCache(SPEC)
    s = cache.add_stream()
    alive = []
    for i in range(5):
        k, v = clip_kv(2, seed=i)
        k.requires_grad_(True)
        w = (k * 2, v * 2)  # non-leaf tensors with a graph, as a model's K/V are
        cache.append([s], *w)
        alive.append(weakref.ref(k))
        del k, v, w
    assert not cache.k.requires_grad and cache.k.grad_fn is None
    assert sum(r() is not None for r in alive) == 0  # nothing appended is held
    got = logical(cache, s)[0]
    expected = torch.cat([clip_kv(2, seed=i)[0][:, 0] * 2 for i in (2, 3, 4)], dim=2)
    torch.testing.assert_close(got, expected)


def test_append_refuses_a_stream_twice_in_one_call():
    cache = KVCache(SPEC)
    s = cache.add_stream()
    with pytest.raises(ValueError, match="must not repeat"):
        cache.append([s, s], *clip_kv(2, batch=2))
    assert cache.length(s) == 0
