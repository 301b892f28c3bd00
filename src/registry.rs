//! The kernel registry: every kernel of the prefill modules (`flash`, `flash_hopper`,
//! `mem_efficient`, `naive`), the decode modules (`decode`, `decode_tc`) and the KV-cache append
//! (`append`), stated once.
//!
//! Each row of [`KERNELS`] gives a kernel's module, entry name, family, element type, head_dim
//! bucket and shape (tile sizes, warps or threads, min-blocks where used); the module gives the
//! minimum arch ([`Module::min_arch`]); the rest (launch shape, shared memory, parameter block,
//! `__launch_bounds__`, template arguments) follows from those by the formulas below. Both sides
//! read this one table:
//!
//! * `build.rs` includes this file with `#[path]` (it depends on `std` and `crate::arch` only)
//!   and writes each module's entry points, `extern "C" __global__` instantiations of the
//!   kernel templates, to `$OUT_DIR/gen/<module>_entries.cuh` ([`entries_header`]), which
//!   `cuda/<module>.cu` includes at its end. nvcc finds it through `-I`; the same text is
//!   embedded beside the sources for NVRTC (and is part of the JIT cache key). build.rs also
//!   checks that every image nvcc built holds exactly the module's kernels.
//! * The crate looks kernels up here ([`lookup`]): function names, the specialisation that
//!   runs a head_dim, launch shape, shared memory, minimum arch.
//!
//! So a kernel named on one side and missing or shaped differently on the other cannot be
//! built. A `.cu` file not listed here would keep a `// attention: min-arch X.Y` first-line
//! marker and hand-written entry points (none does); adding one to the registry means a
//! [`Module`] variant, its rows, a [`Shape`] for its template and an `#include` of its header.
#![allow(dead_code)]

use crate::arch::{ArchSpec, ArchSuffix};
use std::fmt::Write as _;

/// A kernel module: one `cuda/<name>.cu` file, one image (fatbin, or NVRTC output) per arch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Module {
    /// cuda/flash.cu: the mma.sync FlashAttention-2 kernels, sm_80+.
    Flash,
    /// cuda/flash_hopper.cu: flash's wgmma kernels (cp.async and warp-specialised TMA), sm_90a
    /// only.
    FlashHopper,
    /// cuda/mem_efficient.cu: the xFormers-style kernels, sm_75+.
    MemEfficient,
    /// cuda/naive.cu: the materialised-scores kernels, every arch.
    Naive,
    /// cuda/decode.cu: the CUDA-core decode kernels (f32 FMAs), sm_75+, every dtype.
    Decode,
    /// cuda/decode_tc.cu: the tensor-core decode kernels (mma.sync), sm_80+, f16 and bf16.
    DecodeTc,
    /// cuda/append.cu: the KV-cache append (a copy), sm_75+.
    Append,
}

impl Module {
    /// Every module of the registry.
    pub const ALL: [Module; 7] = [
        Module::Flash,
        Module::FlashHopper,
        Module::MemEfficient,
        Module::Naive,
        Module::Decode,
        Module::DecodeTc,
        Module::Append,
    ];

    /// The module's name: its `.cu` file's stem, and its name at run time.
    pub const fn name(self) -> &'static str {
        match self {
            Module::Flash => "flash",
            Module::FlashHopper => "flash_hopper",
            Module::MemEfficient => "mem_efficient",
            Module::Naive => "naive",
            Module::Decode => "decode",
            Module::DecodeTc => "decode_tc",
            Module::Append => "append",
        }
    }

    /// The oldest arch the module is built for. An arch-specific minimum (`9.0a`) means exactly
    /// that arch's arch-specific code: no other arch list entry builds it and no other device
    /// loads it (see [`ArchSpec::provides`]).
    pub const fn min_arch(self) -> ArchSpec {
        match self {
            Module::Flash => ArchSpec::new(8, 0),
            Module::FlashHopper => ArchSpec { major: 9, minor: 0, suffix: ArchSuffix::A, ptx: false },
            Module::MemEfficient => ArchSpec::new(7, 5),
            Module::Naive => ArchSpec::new(0, 0),
            Module::Decode => ArchSpec::new(7, 5),
            Module::DecodeTc => ArchSpec::new(8, 0),
            Module::Append => ArchSpec::new(7, 5),
        }
    }

    /// The generated header with the module's entry points, which `cuda/<name>.cu` includes.
    pub const fn header(self) -> &'static str {
        match self {
            Module::Flash => "flash_entries.cuh",
            Module::FlashHopper => "flash_hopper_entries.cuh",
            Module::MemEfficient => "mem_efficient_entries.cuh",
            Module::Naive => "naive_entries.cuh",
            Module::Decode => "decode_entries.cuh",
            Module::DecodeTc => "decode_tc_entries.cuh",
            Module::Append => "append_entries.cuh",
        }
    }

    /// The module called `name`, if the registry has it.
    pub fn from_name(name: &str) -> Option<Module> {
        Module::ALL.into_iter().find(|m| m.name() == name)
    }

    /// The module's kernels, in table order.
    pub fn kernels(self) -> impl Iterator<Item = &'static Kernel> {
        KERNELS.iter().filter(move |k| k.module == self)
    }
}

/// The element type of a kernel's tensors (the crate's `DType`, which build.rs cannot see).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Elem {
    /// `half::f16`.
    F16,
    /// `half::bf16`.
    BF16,
    /// `f32`.
    F32,
}

impl Elem {
    /// The name in kernel symbols (`f16`, `bf16`, `f32`).
    pub const fn name(self) -> &'static str {
        match self {
            Elem::F16 => "f16",
            Elem::BF16 => "bf16",
            Elem::F32 => "f32",
        }
    }
    /// The element-type policy of cuda/common.cuh (`AttnF16`...).
    const fn cuda_policy(self) -> &'static str {
        match self {
            Elem::F16 => "AttnF16",
            Elem::BF16 => "AttnBF16",
            Elem::F32 => "AttnF32",
        }
    }
    /// The `BF16` template argument of the 16-bit kernels.
    const fn bf16_arg(self) -> &'static str {
        match self {
            Elem::BF16 => "true",
            _ => "false",
        }
    }
}

/// A family of kernels: one kernel template, one naming scheme, one way the host picks and
/// launches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// `flash_fwd` (cuda/flash.cu): mma.sync m16n8k16, K/V through cp.async.
    FlashMmaSync,
    /// `flash_hopper_fwd` (cuda/flash_hopper.cuh): warpgroup MMAs, double-buffered K and V.
    FlashHopper,
    /// The same template with three warpgroups (192-row tiles) at d=128, for long unmasked rows.
    FlashHopperWide,
    /// `flash_hopper_ws_fwd` (cuda/flash_hopper_ws.cuh): a TMA producer warpgroup and consumer
    /// warpgroups on a persistent grid.
    FlashHopperWs,
    /// `me_fwd_tc` (cuda/mem_efficient.cu) with 16-byte vector loads (entry suffix `_a`).
    MemEfficientAligned,
    /// `me_fwd_tc` with element-wise loads (suffix `_u`): any alignment, any head_dim.
    MemEfficientUnaligned,
    /// `me_fwd_simt`: the f32 SIMT kernels.
    MemEfficientSimt,
    /// `naive_scores`: S = scale·QKᵀ into the f32 workspace.
    NaiveScores,
    /// `naive_softmax`: the row softmax of the workspace, in place.
    NaiveSoftmax,
    /// `naive_pv`: O = P·V.
    NaivePv,
    /// `dec_kernel` (cuda/decode.cu): f32 FMAs on 16-byte vector loads, 4 or 8 packed query
    /// rows per block.
    DecodeSimt,
    /// `dtc_kernel` (cuda/decode_tc.cu): mma.sync with keys as the m and 8 packed rows as the n.
    DecodeTc,
    /// `dec_combine` (cuda/decode.cuh): merges split-KV partials by log-sum-exp; one per dtype
    /// in each decode module.
    DecodeCombine,
    /// `append_kernel` (cuda/append.cu) copying element by element: any head_dim and alignment.
    Append,
    /// `append_kernel` copying 16-byte vectors (entry suffix `_v16`).
    AppendVec16,
}

impl Family {
    /// The parameter block the family's kernels take.
    pub const fn params(self) -> ParamBlock {
        match self {
            Family::FlashHopperWs => ParamBlock::AttnTma,
            Family::NaiveScores | Family::NaiveSoftmax | Family::NaivePv => ParamBlock::Naive,
            Family::DecodeSimt | Family::DecodeTc | Family::DecodeCombine => ParamBlock::Decode,
            Family::Append | Family::AppendVec16 => ParamBlock::Append,
            _ => ParamBlock::Attn,
        }
    }
}

/// What a kernel's arguments are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ParamBlock {
    /// One `AttnParams` (cuda/common.cuh; `params::AttnParams` on the host), by value.
    Attn,
    /// `AttnParams` and the Q, K and V tensor maps (`CUtensorMap`), all `__grid_constant__`.
    AttnTma,
    /// `NaiveParams` (cuda/common.cuh; `naive::NaiveParams`) and the stage's pointers.
    Naive,
    /// One `DecodeParams` (cuda/decode.cuh; `decode::DecodeParams`), by value.
    Decode,
    /// One `AppendParams` (cuda/append.cu; `append::AppendParams`), by value.
    Append,
}

/// Warps per decode block (`DEC_WARPS` in cuda/decode.cuh, asserted by the generated headers):
/// the main kernels' warps split a block's keys and merge through shared memory.
pub const DECODE_WARPS: u32 = 4;
/// Threads of a combine block (`DEC_COMBINE_THREADS`): one split's lse per thread, so also the
/// most splits a combine merges.
pub const DECODE_COMBINE_THREADS: u32 = 128;
/// Packed query rows per tensor-core decode block (`DTC_ROWS`): the n of mma m16n8k16.
pub const DECODE_TC_ROWS: u32 = 8;
/// Most split blocks of one thread block cluster that merges through distributed shared memory
/// (`DEC_MAX_CLUSTER`): sm_90's non-portable cluster size.
pub const DECODE_MAX_CLUSTER: u32 = 16;
/// The largest head_dim whose tensor-core decode kernels hold the cluster merge (`CLUSTER`):
/// the d256 kernels use 255 registers, and with the merge's code ptxas spills them on sm_100
/// and sm_120.
pub const DECODE_CLUSTER_MAX_HEAD_DIM: u32 = 128;

/// A kernel's template shape: the arguments its family's template takes besides head_dim and
/// element type, from which the launch shape and shared memory follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Shape {
    /// `flash_fwd<D, BN, WARPS, MT, BF16>`: `warps` warps of `m_tiles` m16 tiles each
    /// (BM = warps·16·m_tiles query rows), `block_n` keys per K/V tile.
    MmaSync { block_n: u32, warps: u32, m_tiles: u32 },
    /// `flash_hopper_fwd<D, BN, WGS, BF16>`: `warpgroups` warpgroups of 64 query rows each;
    /// `__launch_bounds__(128·WGS, min_blocks)`.
    Wgmma { block_n: u32, warpgroups: u32, min_blocks: u32 },
    /// `flash_hopper_ws_fwd<D, BN, CWG, STAGES, BF16>`: one producer warpgroup and `consumers`
    /// consumer warpgroups of 64 rows each, a ring of `stages` K/V buffers;
    /// `__launch_bounds__(128·(CWG + 1), 1)` (the register cap setmaxnreg needs).
    WgmmaWs { block_n: u32, consumers: u32, stages: u32 },
    /// `me_fwd_tc<D, BN, WM, WD, MT, KBUF, BF16, ALIGNED>`: `warps_m` × `warps_d` warps (the
    /// second splits head_dim), `m_tiles` m16 tiles per warp, `k_buffers` K tiles.
    MeTensorCore { block_n: u32, warps_m: u32, warps_d: u32, m_tiles: u32, k_buffers: u32 },
    /// `me_fwd_simt<D, G, BN, THREADS>`: `lanes_per_row` lanes per query row, `block_n` keys
    /// per tile in static shared memory.
    MeSimt { lanes_per_row: u32, block_n: u32, threads: u32 },
    /// A `tile` × `tile` block of threads over as many outputs (`NAIVE_TILE` in cuda/naive.cu):
    /// rows × keys (scores) or rows × head_dim columns (P·V).
    NaiveTile { tile: u32 },
    /// One warp per row, `warps` rows per block (`NAIVE_SOFTMAX_WARPS`).
    NaiveRows { warps: u32 },
    /// `dec_kernel<D, HD, ROWS>`: [`DECODE_WARPS`] warps over `rows` packed query rows.
    DecodeSimt { rows: u32 },
    /// `dtc_kernel<D, BF16, HD, U, WARPS, EF, CLUSTER>`: `warps` warps over [`DECODE_TC_ROWS`]
    /// packed rows, each warp step `tiles` tiles of 16 keys (`U`); `streamed`: K/V loads marked
    /// evict-first in L2 and not allocated in L1 (`EF`, entry suffix `_ef`); `CLUSTER` from
    /// [`Kernel::merges_in_cluster`].
    DecodeTc { tiles: u32, warps: u32, streamed: bool },
    /// `dec_combine<D>`: [`DECODE_COMBINE_THREADS`] threads per (sequence, head, query row).
    DecodeCombine,
    /// `append_kernel<E, C>`: a grid-stride copy, `threads` per block, at least one block per
    /// SM (`__launch_bounds__(threads, 1)`: left to itself ptxas caps sm_120 at 40 registers and
    /// spills).
    AppendCopy { threads: u32 },
}

/// One kernel: a row of [`KERNELS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Kernel {
    /// The entry point's name (formed from the other fields: [`Kernel::formed_name`]).
    pub name: &'static str,
    /// The module whose image holds it.
    pub module: Module,
    /// Its template, naming scheme and the way the host picks it.
    pub family: Family,
    /// The element type of Q, K, V and O (naive's softmax: the f32 scores).
    pub dtype: Elem,
    /// The head_dim the kernel is specialised for: problems up to it (down to the next bucket)
    /// run in it with zero-filled columns. 0: any head_dim.
    pub head_dim: u32,
    /// The template arguments besides head_dim and dtype.
    pub shape: Shape,
    /// The oldest arch whose code holds the kernel's body, when later than the module's: in
    /// the module's images for older arches the entry exists with an empty body (one module
    /// for every arch), and the host never launches it there.
    pub body_min_arch: Option<(u32, u32)>,
}

// Row constructors, one per template.
const fn mma_sync(name: &'static str, dtype: Elem, d: u32, block_n: u32, warps: u32, m_tiles: u32) -> Kernel {
    Kernel {
        name,
        module: Module::Flash,
        family: Family::FlashMmaSync,
        dtype,
        head_dim: d,
        shape: Shape::MmaSync { block_n, warps, m_tiles },
        body_min_arch: None,
    }
}
const fn wgmma(name: &'static str, family: Family, dtype: Elem, d: u32, block_n: u32, warpgroups: u32, min_blocks: u32) -> Kernel {
    Kernel {
        name,
        module: Module::FlashHopper,
        family,
        dtype,
        head_dim: d,
        shape: Shape::Wgmma { block_n, warpgroups, min_blocks },
        body_min_arch: None,
    }
}
const fn wgmma_ws(name: &'static str, dtype: Elem, d: u32, block_n: u32, consumers: u32, stages: u32) -> Kernel {
    Kernel {
        name,
        module: Module::FlashHopper,
        family: Family::FlashHopperWs,
        dtype,
        head_dim: d,
        shape: Shape::WgmmaWs { block_n, consumers, stages },
        body_min_arch: None,
    }
}
#[allow(clippy::too_many_arguments)]
const fn me_tc(
    name: &'static str,
    family: Family,
    dtype: Elem,
    d: u32,
    block_n: u32,
    warps_m: u32,
    warps_d: u32,
    m_tiles: u32,
    k_buffers: u32,
) -> Kernel {
    Kernel {
        name,
        module: Module::MemEfficient,
        family,
        dtype,
        head_dim: d,
        shape: Shape::MeTensorCore { block_n, warps_m, warps_d, m_tiles, k_buffers },
        // bf16 tensor cores need sm_80; the host rejects bf16 below it (Reason::DType).
        body_min_arch: match dtype {
            Elem::BF16 => Some((8, 0)),
            _ => None,
        },
    }
}
const fn me_simt(name: &'static str, d: u32, lanes_per_row: u32, block_n: u32, threads: u32) -> Kernel {
    Kernel {
        name,
        module: Module::MemEfficient,
        family: Family::MemEfficientSimt,
        dtype: Elem::F32,
        head_dim: d,
        shape: Shape::MeSimt { lanes_per_row, block_n, threads },
        body_min_arch: None,
    }
}
const fn naive(name: &'static str, family: Family, dtype: Elem, shape: Shape) -> Kernel {
    Kernel { name, module: Module::Naive, family, dtype, head_dim: 0, shape, body_min_arch: None }
}
const fn dec_simt(name: &'static str, dtype: Elem, d: u32, rows: u32) -> Kernel {
    Kernel {
        name,
        module: Module::Decode,
        family: Family::DecodeSimt,
        dtype,
        head_dim: d,
        shape: Shape::DecodeSimt { rows },
        body_min_arch: None,
    }
}
const fn dec_tc(name: &'static str, dtype: Elem, d: u32, tiles: u32, warps: u32, streamed: bool) -> Kernel {
    Kernel {
        name,
        module: Module::DecodeTc,
        family: Family::DecodeTc,
        dtype,
        head_dim: d,
        shape: Shape::DecodeTc { tiles, warps, streamed },
        body_min_arch: None,
    }
}
const fn append(name: &'static str, family: Family, dtype: Elem) -> Kernel {
    Kernel { name, module: Module::Append, family, dtype, head_dim: 0, shape: Shape::AppendCopy { threads: 256 }, body_min_arch: None }
}
const fn dec_combine(name: &'static str, module: Module, dtype: Elem) -> Kernel {
    Kernel { name, module, family: Family::DecodeCombine, dtype, head_dim: 0, shape: Shape::DecodeCombine, body_min_arch: None }
}

use Elem::{BF16, F16, F32};
use Family::{MemEfficientAligned as MeA, MemEfficientUnaligned as MeU};

/// Every kernel of the registry's modules, in the order of each module's generated header.
pub const KERNELS: &[Kernel] = &[
    // flash (mma.sync, sm_80+): name, dtype, head_dim, keys per tile, warps, m16 tiles per warp.
    mma_sync("attn_flash_fwd_f16_d64", F16, 64, 64, 4, 2),
    mma_sync("attn_flash_fwd_bf16_d64", BF16, 64, 64, 4, 2),
    mma_sync("attn_flash_fwd_f16_d128", F16, 128, 32, 4, 2),
    mma_sync("attn_flash_fwd_bf16_d128", BF16, 128, 32, 4, 2),
    mma_sync("attn_flash_fwd_f16_d256", F16, 256, 16, 8, 1),
    mma_sync("attn_flash_fwd_bf16_d256", BF16, 256, 16, 8, 1),
    // flash_hopper (wgmma, sm_90a): name, family, dtype, head_dim, keys per tile, warpgroups,
    // blocks per SM the registers must allow. The SM needs more than 8 warps to hide each
    // warpgroup's softmax and barrier waits where registers allow: d=64 fits 128 registers at
    // 64-key tiles, so two 2-warpgroup blocks share an SM. d=128 has two kernels: 128-key tiles
    // with 2 warpgroups (~240 registers, one block per SM), and the "wide" one, 64-key tiles with
    // 3 warpgroups (168 registers, 12 warps per SM), which the host picks for long unmasked rows
    // where it measured faster. d=256 holds a 128-register accumulator.
    wgmma("attn_flash_hopper_fwd_f16_d64", Family::FlashHopper, F16, 64, 64, 2, 2),
    wgmma("attn_flash_hopper_fwd_bf16_d64", Family::FlashHopper, BF16, 64, 64, 2, 2),
    wgmma("attn_flash_hopper_fwd_f16_d128", Family::FlashHopper, F16, 128, 128, 2, 1),
    wgmma("attn_flash_hopper_fwd_bf16_d128", Family::FlashHopper, BF16, 128, 128, 2, 1),
    wgmma("attn_flash_hopper_wide_fwd_f16_d128", Family::FlashHopperWide, F16, 128, 64, 3, 1),
    wgmma("attn_flash_hopper_wide_fwd_bf16_d128", Family::FlashHopperWide, BF16, 128, 64, 3, 1),
    wgmma("attn_flash_hopper_fwd_f16_d256", Family::FlashHopper, F16, 256, 64, 2, 1),
    wgmma("attn_flash_hopper_fwd_bf16_d256", Family::FlashHopper, BF16, 256, 64, 2, 1),
    // Warp-specialised (TMA, persistent grid; fixed-length batches, head_dim <= 128): name,
    // dtype, head_dim, keys per tile, consumer warpgroups, K/V ring stages.
    wgmma_ws("attn_flash_ws_fwd_f16_d64", F16, 64, 128, 2, 2),
    wgmma_ws("attn_flash_ws_fwd_bf16_d64", BF16, 64, 128, 2, 2),
    wgmma_ws("attn_flash_ws_fwd_f16_d128", F16, 128, 128, 2, 2),
    wgmma_ws("attn_flash_ws_fwd_bf16_d128", BF16, 128, 128, 2, 2),
    // mem_efficient, tensor cores (sm_75+; bf16 bodies from sm_80): name, family (`_a` vector
    // loads, `_u` element-wise), dtype, head_dim, keys per tile, warps over rows × over
    // head_dim, m16 tiles per warp, K buffers.
    me_tc("attn_me_fwd_f16_d64_a", MeA, F16, 64, 64, 4, 1, 2, 2),
    me_tc("attn_me_fwd_f16_d64_u", MeU, F16, 64, 64, 4, 1, 2, 2),
    me_tc("attn_me_fwd_bf16_d64_a", MeA, BF16, 64, 64, 4, 1, 2, 2),
    me_tc("attn_me_fwd_bf16_d64_u", MeU, BF16, 64, 64, 4, 1, 2, 2),
    me_tc("attn_me_fwd_f16_d128_a", MeA, F16, 128, 32, 4, 1, 2, 2),
    me_tc("attn_me_fwd_f16_d128_u", MeU, F16, 128, 32, 4, 1, 2, 2),
    me_tc("attn_me_fwd_bf16_d128_a", MeA, BF16, 128, 32, 4, 1, 2, 2),
    me_tc("attn_me_fwd_bf16_d128_u", MeU, BF16, 128, 32, 4, 1, 2, 2),
    me_tc("attn_me_fwd_f16_d256_a", MeA, F16, 256, 16, 4, 1, 1, 2),
    me_tc("attn_me_fwd_f16_d256_u", MeU, F16, 256, 16, 4, 1, 1, 2),
    me_tc("attn_me_fwd_bf16_d256_a", MeA, BF16, 256, 16, 4, 1, 1, 2),
    me_tc("attn_me_fwd_bf16_d256_u", MeU, BF16, 256, 16, 4, 1, 1, 2),
    me_tc("attn_me_fwd_f16_d512_a", MeA, F16, 512, 16, 1, 4, 1, 1),
    me_tc("attn_me_fwd_f16_d512_u", MeU, F16, 512, 16, 1, 4, 1, 1),
    me_tc("attn_me_fwd_bf16_d512_a", MeA, BF16, 512, 16, 1, 4, 1, 1),
    me_tc("attn_me_fwd_bf16_d512_u", MeU, BF16, 512, 16, 1, 4, 1, 1),
    // mem_efficient, f32 SIMT: name, head_dim, lanes per row, keys per tile, threads.
    me_simt("attn_me_fwd_f32_d32", 32, 2, 32, 128),
    me_simt("attn_me_fwd_f32_d64", 64, 4, 32, 128),
    me_simt("attn_me_fwd_f32_d128", 128, 8, 32, 128),
    me_simt("attn_me_fwd_f32_d256", 256, 16, 16, 256),
    me_simt("attn_me_fwd_f32_d512", 512, 32, 8, 256),
    // naive: the softmax (on the f32 workspace, whatever the tensors' type), then scores and P·V
    // per type.
    naive("attn_naive_softmax", Family::NaiveSoftmax, F32, Shape::NaiveRows { warps: 8 }),
    naive("attn_naive_scores_f16", Family::NaiveScores, F16, Shape::NaiveTile { tile: 16 }),
    naive("attn_naive_pv_f16", Family::NaivePv, F16, Shape::NaiveTile { tile: 16 }),
    naive("attn_naive_scores_bf16", Family::NaiveScores, BF16, Shape::NaiveTile { tile: 16 }),
    naive("attn_naive_pv_bf16", Family::NaivePv, BF16, Shape::NaiveTile { tile: 16 }),
    naive("attn_naive_scores_f32", Family::NaiveScores, F32, Shape::NaiveTile { tile: 16 }),
    naive("attn_naive_pv_f32", Family::NaivePv, F32, Shape::NaiveTile { tile: 16 }),
    // decode, CUDA cores (sm_75+): name, dtype, head_dim, packed rows per block (4 for up to 4
    // rows per KV head, else 8). A K/V row is one warp's 16-byte loads at most: 256 columns of
    // a 16-bit type, 128 of f32.
    dec_simt("attn_decode_f16_d64_r4", F16, 64, 4),
    dec_simt("attn_decode_f16_d64_r8", F16, 64, 8),
    dec_simt("attn_decode_f16_d128_r4", F16, 128, 4),
    dec_simt("attn_decode_f16_d128_r8", F16, 128, 8),
    dec_simt("attn_decode_f16_d256_r4", F16, 256, 4),
    dec_simt("attn_decode_f16_d256_r8", F16, 256, 8),
    dec_combine("attn_decode_combine_f16", Module::Decode, F16),
    dec_simt("attn_decode_bf16_d64_r4", BF16, 64, 4),
    dec_simt("attn_decode_bf16_d64_r8", BF16, 64, 8),
    dec_simt("attn_decode_bf16_d128_r4", BF16, 128, 4),
    dec_simt("attn_decode_bf16_d128_r8", BF16, 128, 8),
    dec_simt("attn_decode_bf16_d256_r4", BF16, 256, 4),
    dec_simt("attn_decode_bf16_d256_r8", BF16, 256, 8),
    dec_combine("attn_decode_combine_bf16", Module::Decode, BF16),
    dec_simt("attn_decode_f32_d64_r4", F32, 64, 4),
    dec_simt("attn_decode_f32_d64_r8", F32, 64, 8),
    dec_simt("attn_decode_f32_d128_r4", F32, 128, 4),
    dec_simt("attn_decode_f32_d128_r8", F32, 128, 8),
    dec_combine("attn_decode_combine_f32", Module::Decode, F32),
    // decode, tensor cores (sm_80+): name, dtype, head_dim, 16-key tiles per warp step (16 KiB
    // of K/V in flight per warp at d64 and d128; d256 has registers for one), warps. Two-warp
    // blocks (suffix `_w2`) fit twice as many per SM: grids of many short blocks overlap one
    // block's start and drain with others' streaming (none at d256: ptxas spills there).
    // Streamed loads (suffix `_ef`): K/V marked evict-first in L2 and not kept in L1, so a
    // short call's reads do not evict other data (measured on the H200 with the L2 full of dirty
    // lines: +3-9% below about 150 MB of K/V, 4-7% slower above).
    dec_tc("attn_decode_tc_f16_d64", F16, 64, 4, 4, false),
    dec_tc("attn_decode_tc_f16_d128", F16, 128, 2, 4, false),
    dec_tc("attn_decode_tc_f16_d256", F16, 256, 1, 4, false),
    dec_tc("attn_decode_tc_f16_d64_w2", F16, 64, 4, 2, false),
    dec_tc("attn_decode_tc_f16_d128_w2", F16, 128, 2, 2, false),
    dec_tc("attn_decode_tc_f16_d64_ef", F16, 64, 4, 4, true),
    dec_tc("attn_decode_tc_f16_d128_ef", F16, 128, 2, 4, true),
    dec_tc("attn_decode_tc_f16_d256_ef", F16, 256, 1, 4, true),
    dec_combine("attn_decode_combine_f16", Module::DecodeTc, F16),
    dec_tc("attn_decode_tc_bf16_d64", BF16, 64, 4, 4, false),
    dec_tc("attn_decode_tc_bf16_d128", BF16, 128, 2, 4, false),
    dec_tc("attn_decode_tc_bf16_d256", BF16, 256, 1, 4, false),
    dec_tc("attn_decode_tc_bf16_d64_w2", BF16, 64, 4, 2, false),
    dec_tc("attn_decode_tc_bf16_d128_w2", BF16, 128, 2, 2, false),
    dec_tc("attn_decode_tc_bf16_d64_ef", BF16, 64, 4, 4, true),
    dec_tc("attn_decode_tc_bf16_d128_ef", BF16, 128, 2, 4, true),
    dec_tc("attn_decode_tc_bf16_d256_ef", BF16, 256, 1, 4, true),
    dec_combine("attn_decode_combine_bf16", Module::DecodeTc, BF16),
    // append (sm_75+): element copies (any head_dim, any alignment of the element size), then
    // 16-byte vector copies.
    append("attn_append_f16", Family::Append, F16),
    append("attn_append_bf16", Family::Append, BF16),
    append("attn_append_f32", Family::Append, F32),
    append("attn_append_f16_v16", Family::AppendVec16, F16),
    append("attn_append_bf16_v16", Family::AppendVec16, BF16),
    append("attn_append_f32_v16", Family::AppendVec16, F32),
];

impl Kernel {
    /// Threads per block.
    pub const fn threads(&self) -> u32 {
        match self.shape {
            Shape::MmaSync { warps, .. } => warps * 32,
            Shape::Wgmma { warpgroups, .. } => 128 * warpgroups,
            Shape::WgmmaWs { consumers, .. } => 128 * (consumers + 1),
            Shape::MeTensorCore { warps_m, warps_d, .. } => warps_m * warps_d * 32,
            Shape::MeSimt { threads, .. } => threads,
            Shape::NaiveTile { tile } => tile * tile,
            Shape::NaiveRows { warps } => warps * 32,
            Shape::DecodeSimt { .. } => DECODE_WARPS * 32,
            Shape::DecodeTc { warps, .. } => warps * 32,
            Shape::DecodeCombine => DECODE_COMBINE_THREADS,
            Shape::AppendCopy { threads } => threads,
        }
    }

    /// The block's dimensions (x, y, z).
    pub const fn block_dim(&self) -> (u32, u32, u32) {
        match self.shape {
            Shape::NaiveTile { tile } => (tile, tile, 1),
            _ => (self.threads(), 1, 1),
        }
    }

    /// Query rows per block.
    pub const fn block_m(&self) -> u32 {
        match self.shape {
            Shape::MmaSync { warps, m_tiles, .. } => warps * 16 * m_tiles,
            Shape::Wgmma { warpgroups, .. } => 64 * warpgroups,
            Shape::WgmmaWs { consumers, .. } => 64 * consumers,
            Shape::MeTensorCore { warps_m, m_tiles, .. } => warps_m * 16 * m_tiles,
            Shape::MeSimt { lanes_per_row, threads, .. } => threads / lanes_per_row,
            Shape::NaiveTile { tile } => tile,
            Shape::NaiveRows { warps } => warps,
            Shape::DecodeSimt { rows } => rows,
            Shape::DecodeTc { .. } => DECODE_TC_ROWS,
            Shape::DecodeCombine => 1,
            Shape::AppendCopy { .. } => 0,
        }
    }

    /// Keys per K/V tile (naive: keys or head_dim columns per block; 0 for the softmax and for
    /// decode, whose K/V go from global memory straight into registers).
    pub const fn block_n(&self) -> u32 {
        match self.shape {
            Shape::MmaSync { block_n, .. }
            | Shape::Wgmma { block_n, .. }
            | Shape::WgmmaWs { block_n, .. }
            | Shape::MeTensorCore { block_n, .. }
            | Shape::MeSimt { block_n, .. } => block_n,
            Shape::NaiveTile { tile } => tile,
            Shape::NaiveRows { .. }
            | Shape::DecodeSimt { .. }
            | Shape::DecodeTc { .. }
            | Shape::DecodeCombine
            | Shape::AppendCopy { .. } => 0,
        }
    }

    /// Warps per block.
    pub const fn warps(&self) -> u32 {
        self.threads().div_ceil(32)
    }

    /// The second argument of `__launch_bounds__`, where the kernel has one.
    pub const fn min_blocks(&self) -> Option<u32> {
        match self.shape {
            Shape::Wgmma { min_blocks, .. } => Some(min_blocks),
            Shape::WgmmaWs { .. } | Shape::AppendCopy { .. } => Some(1),
            _ => None,
        }
    }

    /// Dynamic shared memory per block, bytes (what the launch passes):
    /// * mma.sync: a Q tile, two K buffers and one V buffer of 16-bit values;
    /// * wgmma: Q, two K and two V buffers, plus 1 KiB to align the base to wgmma's 1024-byte
    ///   swizzle atoms (warp-specialised: and 256 bytes of mbarriers);
    /// * mem_efficient tensor cores: Q, `k_buffers` K tiles and a V tile, plus
    ///   warps_d·BM·BN f32 partial scores when warps split head_dim.
    pub const fn dynamic_smem(&self) -> u32 {
        let (d, bm) = (self.head_dim, self.block_m());
        match self.shape {
            Shape::MmaSync { block_n, .. } => (bm + 3 * block_n) * d * 2,
            Shape::Wgmma { block_n, .. } => (bm + 4 * block_n) * d * 2 + 1024,
            Shape::WgmmaWs { block_n, .. } => (bm + 4 * block_n) * d * 2 + 1024 + 256,
            Shape::MeTensorCore { block_n, warps_d, k_buffers, .. } => {
                let partials = if warps_d > 1 { warps_d * bm * block_n * 4 } else { 0 };
                (bm + (k_buffers + 1) * block_n) * d * 2 + partials
            }
            Shape::MeSimt { .. }
            | Shape::NaiveTile { .. }
            | Shape::NaiveRows { .. }
            | Shape::DecodeSimt { .. }
            | Shape::DecodeTc { .. }
            | Shape::DecodeCombine
            | Shape::AppendCopy { .. } => 0,
        }
    }

    /// Static shared memory per block, bytes (declared in the kernel; ptxas reports it):
    /// the f32 kernels' K and V tiles, naive's two padded tiles, decode's per-warp accumulators
    /// and (max, sum) pairs per row, the combine's weights, warp partials and row vectors.
    pub const fn static_smem(&self) -> u32 {
        match self.shape {
            Shape::MeSimt { block_n, .. } => 2 * block_n * self.head_dim * 4,
            Shape::NaiveTile { tile } => 2 * tile * (tile + 1) * 4,
            Shape::DecodeSimt { .. } | Shape::DecodeTc { .. } => self.warps() * self.block_m() * (self.head_dim + 2) * 4,
            Shape::DecodeCombine => DECODE_COMBINE_THREADS * (4 + 16) + DECODE_COMBINE_THREADS / 32 * 4,
            _ => 0,
        }
    }

    /// All the shared memory a block needs.
    pub const fn shared_bytes(&self) -> u32 {
        self.dynamic_smem() + self.static_smem()
    }

    /// Whether the kernel's K/V loads stream (evict-first in L2, not kept in L1: the `_ef`
    /// tensor-core decode kernels).
    pub const fn streams_loads(&self) -> bool {
        matches!(self.shape, Shape::DecodeTc { streamed: true, .. })
    }

    /// Whether a split grid of this kernel may merge its splits inside a thread block cluster
    /// (tensor-core decode up to [`DECODE_CLUSTER_MAX_HEAD_DIM`]; sm_90+ at run time).
    pub const fn merges_in_cluster(&self) -> bool {
        matches!(self.shape, Shape::DecodeTc { .. }) && self.head_dim <= DECODE_CLUSTER_MAX_HEAD_DIM
    }

    /// The parameter block the kernel takes.
    pub const fn params(&self) -> ParamBlock {
        self.family.params()
    }

    /// The oldest arch the kernel runs on: its module's, or its body's when later.
    pub const fn min_arch(&self) -> (u32, u32) {
        let m = self.module.min_arch();
        match self.body_min_arch {
            Some((major, minor)) if major > m.major || (major == m.major && minor > m.minor) => (major, minor),
            _ => (m.major, m.minor),
        }
    }

    /// The entry name the family's naming scheme gives this kernel.
    pub fn formed_name(&self) -> String {
        let (t, d) = (self.dtype.name(), self.head_dim);
        match self.family {
            Family::FlashMmaSync => format!("attn_flash_fwd_{t}_d{d}"),
            Family::FlashHopper => format!("attn_flash_hopper_fwd_{t}_d{d}"),
            Family::FlashHopperWide => format!("attn_flash_hopper_wide_fwd_{t}_d{d}"),
            Family::FlashHopperWs => format!("attn_flash_ws_fwd_{t}_d{d}"),
            Family::MemEfficientAligned => format!("attn_me_fwd_{t}_d{d}_a"),
            Family::MemEfficientUnaligned => format!("attn_me_fwd_{t}_d{d}_u"),
            Family::MemEfficientSimt => format!("attn_me_fwd_{t}_d{d}"),
            Family::NaiveScores => format!("attn_naive_scores_{t}"),
            Family::NaiveSoftmax => "attn_naive_softmax".to_string(),
            Family::NaivePv => format!("attn_naive_pv_{t}"),
            Family::DecodeSimt => format!("attn_decode_{t}_d{d}_r{}", self.block_m()),
            Family::DecodeTc => {
                let warps = match self.warps() {
                    DECODE_WARPS => String::new(),
                    w => format!("_w{w}"),
                };
                let streamed = if self.streams_loads() { "_ef" } else { "" };
                format!("attn_decode_tc_{t}_d{d}{warps}{streamed}")
            }
            Family::DecodeCombine => format!("attn_decode_combine_{t}"),
            Family::Append => format!("attn_append_{t}"),
            Family::AppendVec16 => format!("attn_append_{t}_v16"),
        }
    }

    /// The CUDA parameter list of the entry point.
    fn cuda_params(&self) -> String {
        let t = self.dtype.cuda_policy();
        match self.family {
            Family::NaiveScores => format!("NaiveParams p, const {t}::storage* q, const {t}::storage* k, float* s"),
            Family::NaiveSoftmax => "NaiveParams p, float* __restrict__ s, float* __restrict__ lse".to_string(),
            Family::NaivePv => format!("NaiveParams p, const float* s, const {t}::storage* v, {t}::storage* o"),
            Family::FlashHopperWs => "const __grid_constant__ AttnParams p, const __grid_constant__ AttnTensorMap tq,\n    \
                 const __grid_constant__ AttnTensorMap tk, const __grid_constant__ AttnTensorMap tv"
                .to_string(),
            Family::DecodeSimt | Family::DecodeTc | Family::DecodeCombine => "DecodeParams p".to_string(),
            Family::Append | Family::AppendVec16 => "const AppendParams p".to_string(),
            _ => "const AttnParams p".to_string(),
        }
    }

    /// The entry point's body: the family's template, instantiated.
    fn cuda_body(&self) -> String {
        let (d, b) = (self.head_dim, self.dtype.bf16_arg());
        let t = self.dtype.cuda_policy();
        match (self.shape, self.family) {
            (Shape::MmaSync { block_n, warps, m_tiles }, _) => format!("flash_fwd<{d}, {block_n}, {warps}, {m_tiles}, {b}>(p);"),
            (Shape::Wgmma { block_n, warpgroups, .. }, _) => format!("flash_hopper_fwd<{d}, {block_n}, {warpgroups}, {b}>(p);"),
            (Shape::WgmmaWs { block_n, consumers, stages }, _) => {
                format!("flash_hopper_ws_fwd<{d}, {block_n}, {consumers}, {stages}, {b}>(p, tq, tk, tv);")
            }
            (Shape::MeTensorCore { block_n, warps_m, warps_d, m_tiles, k_buffers }, family) => format!(
                "me_fwd_tc<{d}, {block_n}, {warps_m}, {warps_d}, {m_tiles}, {k_buffers}, {b}, {}>(p);",
                family == Family::MemEfficientAligned
            ),
            (Shape::MeSimt { lanes_per_row, block_n, threads }, _) => {
                format!("me_fwd_simt<{d}, {lanes_per_row}, {block_n}, {threads}>(p);")
            }
            (_, Family::NaiveScores) => format!("naive_scores<{t}>(p, q, k, s);"),
            (_, Family::NaivePv) => format!("naive_pv<{t}>(p, s, v, o);"),
            (Shape::DecodeSimt { rows }, _) => format!("dec_kernel<{t}, {d}, {rows}>(p);"),
            (Shape::DecodeTc { tiles, warps, streamed }, _) => {
                format!("dtc_kernel<{t}, {b}, {d}, {tiles}, {warps}, {streamed}, {}>(p);", self.merges_in_cluster())
            }
            (Shape::DecodeCombine, _) => format!("dec_combine<{t}>(p);"),
            (Shape::AppendCopy { .. }, family) => {
                // A pure copy: the storage's bits, as one element or one 16-byte vector.
                let e = if self.dtype == Elem::F32 { "unsigned int" } else { "unsigned short" };
                let c = if family == Family::AppendVec16 { "AppendVec16" } else { e };
                format!("append_kernel<{e}, {c}>(p);")
            }
            // The thread indices are read here, where __launch_bounds__ bounds them for the compiler.
            (_, _) => "naive_softmax(p, s, lse, threadIdx.x % ATTN_WARP_SIZE, threadIdx.x / ATTN_WARP_SIZE);".to_string(),
        }
    }

    /// The `extern "C" __global__` definition; `body` false gives the empty entry of an arch
    /// below [`Kernel::body_min_arch`].
    fn cuda_entry(&self, body: bool) -> String {
        let bounds = match self.min_blocks() {
            Some(min) => format!("{}, {min}", self.threads()),
            None => self.threads().to_string(),
        };
        let body = if body { format!("\n    {}\n", self.cuda_body()) } else { String::new() };
        format!(
            "extern \"C\" __global__ void __launch_bounds__({bounds}) {}({}) {{{body}}}\n",
            self.name,
            self.cuda_params()
        )
    }
}

/// The smallest specialisation of `family` for `dtype` that runs `head_dim` (the kernel with
/// the smallest head_dim bucket at or above it), if any.
pub fn lookup(family: Family, dtype: Elem, head_dim: usize) -> Option<&'static Kernel> {
    let mut best: Option<&'static Kernel> = None;
    for k in KERNELS {
        let fits = k.head_dim == 0 || k.head_dim as usize >= head_dim;
        if k.family == family && k.dtype == dtype && fits && best.is_none_or(|b| k.head_dim < b.head_dim) {
            best = Some(k);
        }
    }
    best
}

/// The kernel called `name`.
///
/// Names are unique within a module; the decode modules each have their own combine under the
/// same name, and this gives the first (use [`kernel_in`] where the module matters).
pub fn kernel(name: &str) -> Option<&'static Kernel> {
    KERNELS.iter().find(|k| k.name == name)
}

/// The kernel called `name` in `module`.
pub fn kernel_in(module: Module, name: &str) -> Option<&'static Kernel> {
    module.kernels().find(|k| k.name == name)
}

/// How many kernels `module` has (a constant: sizes [`names`]' array).
pub const fn count(module: Module) -> usize {
    let (mut i, mut n) = (0, 0);
    while i < KERNELS.len() {
        if KERNELS[i].module as u8 == module as u8 {
            n += 1;
        }
        i += 1;
    }
    n
}

/// The entry names of `module`, in table order; `N` is [`count`]`(module)` (checked at compile
/// time where it is used in a constant).
pub const fn names<const N: usize>(module: Module) -> [&'static str; N] {
    let mut out = [""; N];
    let (mut i, mut n) = (0, 0);
    while i < KERNELS.len() {
        if KERNELS[i].module as u8 == module as u8 {
            out[n] = KERNELS[i].name;
            n += 1;
        }
        i += 1;
    }
    assert!(n == N, "names::<N>: N is not count(module)");
    out
}

/// The largest head_dim bucket among `module`'s kernels.
pub const fn max_head_dim(module: Module) -> usize {
    let (mut i, mut max) = (0, 0);
    while i < KERNELS.len() {
        if KERNELS[i].module as u8 == module as u8 && KERNELS[i].head_dim > max {
            max = KERNELS[i].head_dim;
        }
        i += 1;
    }
    max as usize
}

/// The constants of a module's `.cu` file that the table's shapes must match, checked by
/// `static_assert`s in the generated header (the kernels use them outside the templates).
fn cuda_asserts(module: Module) -> Vec<String> {
    let assert = |constant: &str, value: u32| {
        format!("static_assert({constant} == {value}, \"{constant} differs from the registry's (src/registry.rs)\");")
    };
    let mut out = Vec::new();
    for k in module.kernels() {
        let asserts = match k.shape {
            Shape::NaiveTile { tile } => vec![assert("NAIVE_TILE", tile)],
            Shape::NaiveRows { warps } => vec![assert("NAIVE_SOFTMAX_WARPS", warps)],
            Shape::DecodeSimt { .. } => vec![assert("DEC_WARPS", DECODE_WARPS)],
            Shape::DecodeTc { .. } => vec![assert("DTC_ROWS", DECODE_TC_ROWS), assert("DEC_MAX_CLUSTER", DECODE_MAX_CLUSTER)],
            Shape::DecodeCombine => vec![assert("DEC_COMBINE_THREADS", DECODE_COMBINE_THREADS)],
            Shape::AppendCopy { threads } => vec![assert("APPEND_THREADS", threads)],
            _ => continue,
        };
        for a in asserts {
            if !out.contains(&a) {
                out.push(a);
            }
        }
    }
    out
}

/// The generated header of `module`: its entry points, which `cuda/<module>.cu` includes after
/// the kernel templates.
pub fn entries_header(module: Module) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "// @generated by build.rs from src/registry.rs: the entry points of module {}. Do not edit:\n\
         // change the table in src/registry.rs.\n#pragma once",
        module.name()
    );
    for a in cuda_asserts(module) {
        let _ = writeln!(s, "{a}");
    }
    let m = module.min_arch();
    for k in module.kernels() {
        let head_dim = if k.head_dim == 0 { "any head_dim".to_string() } else { format!("head_dim {}", k.head_dim) };
        let _ = writeln!(
            s,
            "\n// {}: {}, {head_dim}, {} threads, {} query rows per block, {} B shared memory ({} dynamic)",
            k.name,
            k.dtype.name(),
            k.threads(),
            k.block_m(),
            k.shared_bytes(),
            k.dynamic_smem()
        );
        match k.body_min_arch {
            Some((major, minor)) if (major, minor) > (m.major, m.minor) => {
                let _ = write!(
                    s,
                    "#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= {}\n{}#else\n{}#endif\n",
                    major * 100 + minor * 10,
                    k.cuda_entry(true),
                    k.cuda_entry(false)
                );
            }
            _ => s.push_str(&k.cuda_entry(true)),
        }
    }
    s
}

/// Checks the table: unique names formed by each family's scheme, kernels in the module their
/// family belongs to, bucket sizes the templates accept. build.rs refuses to build otherwise.
pub fn validate() -> Result<(), String> {
    let mut errors = Vec::new();
    for (i, k) in KERNELS.iter().enumerate() {
        if k.name != k.formed_name() {
            errors.push(format!("{}: the {:?} scheme names it {}", k.name, k.family, k.formed_name()));
        }
        if KERNELS[..i].iter().any(|o| o.name == k.name && o.module == k.module) {
            errors.push(format!("{}: listed twice in module {}", k.name, k.module.name()));
        }
        let modules: &[Module] = match k.family {
            Family::FlashMmaSync => &[Module::Flash],
            Family::FlashHopper | Family::FlashHopperWide | Family::FlashHopperWs => &[Module::FlashHopper],
            Family::MemEfficientAligned | Family::MemEfficientUnaligned | Family::MemEfficientSimt => &[Module::MemEfficient],
            Family::NaiveScores | Family::NaiveSoftmax | Family::NaivePv => &[Module::Naive],
            Family::DecodeSimt => &[Module::Decode],
            Family::DecodeTc => &[Module::DecodeTc],
            Family::DecodeCombine => &[Module::Decode, Module::DecodeTc],
            Family::Append | Family::AppendVec16 => &[Module::Append],
        };
        if !modules.contains(&k.module) {
            errors.push(format!("{}: family {:?} belongs to module {}", k.name, k.family, modules[0].name()));
        }
        // Kernels that take any head_dim (0): naive's, the combine and the append (head_dim is a
        // parameter).
        let any = matches!(
            k.family,
            Family::NaiveScores | Family::NaiveSoftmax | Family::NaivePv | Family::DecodeCombine | Family::Append | Family::AppendVec16
        );
        if any != (k.head_dim == 0) || (!any && k.head_dim % 8 != 0) {
            errors.push(format!("{}: head_dim {} (0 for naive, the combine and the append, else a multiple of 8)", k.name, k.head_dim));
        }
        let tc = matches!(
            k.shape,
            Shape::MmaSync { .. } | Shape::Wgmma { .. } | Shape::WgmmaWs { .. } | Shape::MeTensorCore { .. } | Shape::DecodeTc { .. }
        );
        if tc && k.dtype == Elem::F32 || k.family == Family::MemEfficientSimt && k.dtype != Elem::F32 {
            errors.push(format!("{}: {} on this template", k.name, k.dtype.name()));
        }
        if k.threads() == 0 || k.threads() % 32 != 0 || k.threads() > 1024 {
            errors.push(format!("{}: {} threads", k.name, k.threads()));
        }
    }
    for m in Module::ALL {
        if m.kernels().next().is_none() {
            errors.push(format!("module {} has no kernel", m.name()));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!("src/registry.rs: {}", errors.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_valid() {
        validate().unwrap();
    }

    #[test]
    fn lookups_take_the_smallest_bucket_at_or_above() {
        let name = |f, t, d| lookup(f, t, d).map(|k| k.name);
        assert_eq!(name(Family::FlashMmaSync, F16, 8), Some("attn_flash_fwd_f16_d64"));
        assert_eq!(name(Family::FlashMmaSync, BF16, 72), Some("attn_flash_fwd_bf16_d128"));
        assert_eq!(name(Family::FlashMmaSync, BF16, 256), Some("attn_flash_fwd_bf16_d256"));
        assert_eq!(name(Family::FlashMmaSync, BF16, 264), None);
        assert_eq!(name(Family::FlashMmaSync, F32, 64), None);
        assert_eq!(name(Family::FlashHopperWs, F16, 136), None);
        assert_eq!(name(Family::MemEfficientSimt, F32, 1), Some("attn_me_fwd_f32_d32"));
        assert_eq!(name(Family::NaiveSoftmax, F32, 4096), Some("attn_naive_softmax"));
        assert_eq!(max_head_dim(Module::Flash), 256);
        assert_eq!(max_head_dim(Module::MemEfficient), 512);
        assert_eq!(count(Module::FlashHopper), 12);
        assert_eq!(names::<6>(Module::Flash)[5], "attn_flash_fwd_bf16_d256");
        assert_eq!(name(Family::DecodeTc, BF16, 72), Some("attn_decode_tc_bf16_d128"));
        assert_eq!(name(Family::DecodeTc, F32, 64), None);
        assert_eq!(max_head_dim(Module::DecodeTc), 256);
        assert_eq!((count(Module::Decode), count(Module::DecodeTc)), (19, 18));
    }

    #[test]
    fn min_arch_of_kernels_and_modules() {
        assert_eq!(kernel("attn_me_fwd_bf16_d64_u").unwrap().min_arch(), (8, 0));
        assert_eq!(kernel("attn_me_fwd_f16_d64_u").unwrap().min_arch(), (7, 5));
        assert_eq!(kernel("attn_flash_ws_fwd_f16_d64").unwrap().min_arch(), (9, 0));
        assert_eq!(Module::FlashHopper.min_arch().to_string(), "9.0a");
        assert_eq!(Module::from_name("naive"), Some(Module::Naive));
    }

    #[test]
    fn generated_entries_keep_launch_bounds_and_template_arguments() {
        let flash = entries_header(Module::Flash);
        assert!(flash.contains(
            "extern \"C\" __global__ void __launch_bounds__(256) attn_flash_fwd_bf16_d256(const AttnParams p) {\n    \
             flash_fwd<256, 16, 8, 1, true>(p);\n}\n"
        ));
        let hopper = entries_header(Module::FlashHopper);
        assert!(hopper.contains("__launch_bounds__(256, 2) attn_flash_hopper_fwd_f16_d64(const AttnParams p)"));
        assert!(hopper.contains("__launch_bounds__(384, 1) attn_flash_hopper_wide_fwd_bf16_d128("));
        assert!(hopper.contains("flash_hopper_ws_fwd<128, 128, 2, 2, true>(p, tq, tk, tv);"));
        assert!(hopper.contains("__launch_bounds__(384, 1) attn_flash_ws_fwd_f16_d64(const __grid_constant__ AttnParams p,"));
        let me = entries_header(Module::MemEfficient);
        assert!(me.contains(
            "#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800\nextern \"C\" __global__ void __launch_bounds__(128) \
             attn_me_fwd_bf16_d512_u(const AttnParams p) {\n    me_fwd_tc<512, 16, 1, 4, 1, 1, true, false>(p);\n}\n#else\n\
             extern \"C\" __global__ void __launch_bounds__(128) attn_me_fwd_bf16_d512_u(const AttnParams p) {}\n#endif\n"
        ));
        assert!(me.contains("__launch_bounds__(256) attn_me_fwd_f32_d512(const AttnParams p) {\n    me_fwd_simt<512, 32, 8, 256>(p);"));
        let naive = entries_header(Module::Naive);
        assert!(naive.contains("static_assert(NAIVE_TILE == 16,"));
        assert!(naive.contains(
            "__launch_bounds__(256) attn_naive_pv_bf16(NaiveParams p, const float* s, const AttnBF16::storage* v, \
             AttnBF16::storage* o) {\n    naive_pv<AttnBF16>(p, s, v, o);"
        ));
    }

    #[test]
    fn shared_memory_formulas() {
        let smem = |n| kernel(n).unwrap().dynamic_smem();
        // mma.sync: Q + 2 K + V; the d=256 kernel fits the A100/H100 opt-in limit, not 64 KiB.
        assert_eq!(smem("attn_flash_fwd_f16_d256"), 90112);
        assert_eq!(smem("attn_flash_fwd_f16_d128"), 57344);
        assert_eq!(smem("attn_flash_fwd_f16_d64"), 40960);
        // Hopper: Q + 2 K + 2 V + alignment; warp-specialised: + barriers.
        assert_eq!(smem("attn_flash_hopper_fwd_f16_d64"), 50176);
        assert_eq!(smem("attn_flash_hopper_fwd_f16_d128"), 164864);
        assert_eq!(smem("attn_flash_hopper_wide_fwd_f16_d128"), 115712);
        assert_eq!(smem("attn_flash_hopper_fwd_f16_d256"), 197632);
        assert_eq!(smem("attn_flash_ws_fwd_f16_d128"), 163840 + 1024 + 256);
        assert_eq!(smem("attn_flash_ws_fwd_f16_d64"), 81920 + 1024 + 256);
        // mem_efficient (the table in cuda/mem_efficient.cu's comments).
        assert_eq!(smem("attn_me_fwd_f16_d64_a"), 40960);
        assert_eq!(smem("attn_me_fwd_f16_d128_u"), 57344);
        assert_eq!(smem("attn_me_fwd_bf16_d256_a"), 57344);
        assert_eq!(smem("attn_me_fwd_f16_d512_a"), 53248);
        assert_eq!(kernel("attn_me_fwd_f16_d512_a").unwrap().block_m(), 16);
        assert_eq!(kernel("attn_me_fwd_f32_d512").unwrap().static_smem(), 32768);
        assert_eq!(kernel("attn_naive_scores_f16").unwrap().static_smem(), 2176);
        // Decode: the figures ptxas reported for the hand-written entries.
        assert_eq!(kernel("attn_decode_bf16_d128_r4").unwrap().static_smem(), 8320);
        assert_eq!(kernel("attn_decode_f16_d64_r8").unwrap().static_smem(), 8448);
        assert_eq!(kernel("attn_decode_f16_d256_r8").unwrap().static_smem(), 33024);
        assert_eq!(kernel("attn_decode_tc_bf16_d128").unwrap().static_smem(), 16640);
        assert_eq!(kernel_in(Module::DecodeTc, "attn_decode_combine_f16").unwrap().static_smem(), 2576);
    }

    #[test]
    fn decode_entries() {
        let tc = entries_header(Module::DecodeTc);
        assert!(tc.contains("static_assert(DTC_ROWS == 8,"));
        assert!(tc.contains("static_assert(DEC_MAX_CLUSTER == 16,"));
        assert!(tc.contains("__launch_bounds__(128) attn_decode_tc_bf16_d64(DecodeParams p) {\n    dtc_kernel<AttnBF16, true, 64, 4, 4, false, true>(p);"));
        assert!(tc.contains("__launch_bounds__(64) attn_decode_tc_f16_d128_w2(DecodeParams p) {\n    dtc_kernel<AttnF16, false, 128, 2, 2, false, true>(p);"));
        assert!(tc.contains("__launch_bounds__(128) attn_decode_tc_bf16_d128_ef(DecodeParams p) {\n    dtc_kernel<AttnBF16, true, 128, 2, 4, true, true>(p);"));
        assert!(tc.contains("attn_decode_tc_f16_d256(DecodeParams p) {\n    dtc_kernel<AttnF16, false, 256, 1, 4, false, false>(p);"));
        assert_eq!(kernel("attn_decode_tc_f16_d128_w2").unwrap().static_smem(), 8320);
        assert!(tc.contains("__launch_bounds__(128) attn_decode_combine_f16(DecodeParams p) {\n    dec_combine<AttnF16>(p);"));
        let simt = entries_header(Module::Decode);
        assert!(simt.contains("attn_decode_f32_d128_r8(DecodeParams p) {\n    dec_kernel<AttnF32, 128, 8>(p);"));
        assert!(!simt.contains("attn_decode_f32_d256"));
        assert_eq!(kernel_in(Module::DecodeTc, "attn_decode_combine_bf16").unwrap().module, Module::DecodeTc);
        let append = entries_header(Module::Append);
        assert!(append.contains("static_assert(APPEND_THREADS == 256,"));
        assert!(append.contains(
            "__launch_bounds__(256, 1) attn_append_bf16_v16(const AppendParams p) {\n    append_kernel<unsigned short, AppendVec16>(p);"
        ));
        assert!(append.contains("attn_append_f32(const AppendParams p) {\n    append_kernel<unsigned int, unsigned int>(p);"));
    }
}
