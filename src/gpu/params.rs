//! The parameter block the fused kernels (flash, mem_efficient) take by value.

use std::ffi::c_void;

use cudarc::driver::sys::{self, CUfunction_attribute};
use cudarc::driver::{result, CudaFunction};

use super::device::{device_addr, launch_failure};
use super::tma::TensorMap;
use crate::backend::RunError;
use crate::call::{Call, Operand};

/// Mirrors `struct AttnParams` in cuda/common.cuh (the kernel side checks its size is 208).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct AttnParams {
    pub q_stride: [i64; 3],
    pub k_stride: [i64; 3],
    pub v_stride: [i64; 3],
    pub o_stride: [i64; 3],
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub o: u64,
    pub lse: u64,
    pub cu_seqlens_q: u64,
    pub cu_seqlens_k: u64,
    pub batch: i32,
    pub heads: i32,
    pub kv_group: i32,
    pub seqlen_q: i32,
    pub seqlen_k: i32,
    pub total_q: i32,
    pub total_k: i32,
    pub head_dim: i32,
    pub window_left: i32,
    pub window_right: i32,
    pub causal: i32,
    pub scale: f32,
    pub softcap: f32,
    pub flags: i32,
}
const _: () = {
    assert!(std::mem::size_of::<AttnParams>() == 208);
    assert!(std::mem::offset_of!(AttnParams, cu_seqlens_q) == 136);
    assert!(std::mem::offset_of!(AttnParams, batch) == 152);
    assert!(std::mem::offset_of!(AttnParams, scale) == 196);
    assert!(std::mem::offset_of!(AttnParams, flags) == 204);
};

/// `ATTN_FLAG_ALLOW_TF32` in cuda/common.cuh.
pub(crate) const FLAG_ALLOW_TF32: i32 = 1;

/// A window side as the kernels take it: -1 for unlimited.
pub(crate) fn window_arg(w: Option<usize>) -> i32 {
    w.map(|w| w.min(i32::MAX as usize) as i32).unwrap_or(-1)
}

/// A view's element strides of [batch, seq, head], as the kernels take them.
pub(crate) fn strides(o: &Operand) -> [i64; 3] {
    o.layout.strides().map(|s| s as i64)
}

impl AttnParams {
    /// The parameters of a validated device call (every size was checked to fit in i32).
    pub(crate) fn of(call: &Call<'_>) -> Self {
        let p = &call.problem;
        let (cu_q, cu_k, total_q, total_k) = match &call.varlen {
            Some(v) => (v.cu_seqlens_q.device_or_null(), v.cu_seqlens_k.device_or_null(), v.total_q, v.total_k),
            None => (0, 0, p.seqlen_q, p.seqlen_k),
        };
        AttnParams {
            q_stride: strides(&call.q),
            k_stride: strides(&call.k),
            v_stride: strides(&call.v),
            o_stride: strides(&call.out),
            q: device_addr(&call.q),
            k: device_addr(&call.k),
            v: device_addr(&call.v),
            o: device_addr(&call.out),
            lse: call.lse.as_ref().map(device_addr).unwrap_or(0),
            cu_seqlens_q: cu_q,
            cu_seqlens_k: cu_k,
            batch: p.batch as i32,
            heads: p.heads as i32,
            kv_group: (p.heads / p.kv_heads) as i32,
            seqlen_q: p.seqlen_q as i32,
            seqlen_k: p.seqlen_k as i32,
            total_q: total_q as i32,
            total_k: total_k as i32,
            head_dim: p.head_dim as i32,
            window_left: window_arg(call.mask.left),
            window_right: window_arg(call.mask.right),
            causal: p.causal as i32,
            scale: call.scale,
            softcap: call.softcap.unwrap_or(0.0),
            flags: if call.allow_tf32 { FLAG_ALLOW_TF32 } else { 0 },
        }
    }
}

/// Dynamic shared memory a kernel may use without opting in.
const SMEM_NO_OPTIN: usize = 48 * 1024;

/// Launches a fused kernel on the call's stream: one block of `threads` per (`block_m` query
/// rows, head, batch), the call's `AttnParams` as its one by-value argument. For a packed batch
/// `seqlen_q` is the longest sequence; blocks past a shorter one return at once.
pub(crate) fn launch_fused(
    func: &CudaFunction,
    call: &Call<'_>,
    block_m: usize,
    threads: usize,
    smem: usize,
) -> Result<(), RunError> {
    let p = &call.problem;
    let grid = (p.seqlen_q.div_ceil(block_m) as u32, p.heads as u32, p.batch as u32);
    let mut params = AttnParams::of(call);
    let mut args = [&mut params as *mut AttnParams as *mut c_void];
    launch(func, call, grid, threads, smem, &mut args)
}

/// Launches a persistent fused kernel (flash's warp-specialised one): `blocks` blocks that stride
/// over the work themselves, with the `AttnParams` and the Q, K, V tensor maps as arguments.
pub(crate) fn launch_persistent(
    func: &CudaFunction,
    call: &Call<'_>,
    blocks: u32,
    threads: usize,
    smem: usize,
    maps: [TensorMap; 3],
) -> Result<(), RunError> {
    let mut params = AttnParams::of(call);
    let [mut tq, mut tk, mut tv] = maps;
    let mut args = [
        &mut params as *mut AttnParams as *mut c_void,
        &mut tq as *mut TensorMap as *mut c_void,
        &mut tk as *mut TensorMap as *mut c_void,
        &mut tv as *mut TensorMap as *mut c_void,
    ];
    launch(func, call, (blocks, 1, 1), threads, smem, &mut args)
}

/// Launches `func` on the call's stream with `args` (one pointer per kernel parameter).
pub(crate) fn launch(
    func: &CudaFunction,
    call: &Call<'_>,
    grid: (u32, u32, u32),
    threads: usize,
    smem: usize,
    args: &mut [*mut c_void],
) -> Result<(), RunError> {
    if smem > SMEM_NO_OPTIN {
        func.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
            .map_err(|e| launch_failure(e.0, false))?;
    }
    // SAFETY: `args` holds one pointer per parameter the entry point declares, each to a live
    // value of the declared type (AttnParams, then TensorMaps for the persistent kernel); every
    // device pointer inside was checked against its allocation by `prepare`.
    unsafe { result::launch_kernel(func.cu_function(), grid, (threads as u32, 1, 1), smem as u32, call.stream, args) }
        .map_err(|e| launch_failure(e.0, false))
}

/// As [`launch`], for a kernel that consumes what the kernel launched just before it on the
/// same stream wrote, and waits for it on the device (`griddepcontrol.wait`): on sm_90+
/// (`programmatic`) it is launched as a programmatic dependent, so the driver sets it up while
/// that kernel's last blocks still run instead of after they finish (a microsecond or two a
/// launch, which is what a short decode step costs). Elsewhere a plain launch.
pub(crate) fn launch_dependent(
    func: &CudaFunction,
    call: &Call<'_>,
    grid: (u32, u32, u32),
    threads: usize,
    args: &mut [*mut c_void],
    programmatic: bool,
) -> Result<(), RunError> {
    if !programmatic {
        return launch(func, call, grid, threads, 0, args);
    }
    // SAFETY: a zeroed attribute is a valid value of the C union; the two fields set below are
    // the ones the driver reads for this attribute id.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    launch_with(func, call, grid, threads, args, attr)
}

/// As [`launch`], with the grid's blocks grouped into thread block clusters of `cluster` blocks
/// along x (sm_90+), whose blocks read each other's shared memory. Sizes above the portable 8
/// need the function's non-portable attribute, which [`active_clusters`] sets.
pub(crate) fn launch_clustered(
    func: &CudaFunction,
    call: &Call<'_>,
    grid: (u32, u32, u32),
    threads: usize,
    args: &mut [*mut c_void],
    cluster: u32,
) -> Result<(), RunError> {
    launch_with(func, call, grid, threads, args, cluster_attribute(cluster))
}

/// `cuLaunchKernelEx` of `func` on the call's stream with one launch attribute.
fn launch_with(
    func: &CudaFunction,
    call: &Call<'_>,
    grid: (u32, u32, u32),
    threads: usize,
    args: &mut [*mut c_void],
    mut attr: sys::CUlaunchAttribute,
) -> Result<(), RunError> {
    let config = launch_config(grid, threads, call.stream, &mut attr);
    // SAFETY: as for `launch`: one pointer per declared parameter, each to a live value of its
    // type; `config` and `attr` outlive the call.
    unsafe { sys::cuLaunchKernelEx(&config, func.cu_function(), args.as_mut_ptr(), std::ptr::null_mut()) }
        .result()
        .map_err(|e| launch_failure(e.0, false))
}

/// The launch attribute that groups a grid's blocks into clusters of `cluster` along x.
fn cluster_attribute(cluster: u32) -> sys::CUlaunchAttribute {
    // SAFETY: a zeroed attribute is a valid value of the C union; the fields set below are the
    // ones the driver reads for this attribute id.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
    attr.value.clusterDim.x = cluster;
    attr.value.clusterDim.y = 1;
    attr.value.clusterDim.z = 1;
    attr
}

/// A launch of `threads`-thread blocks (no dynamic shared memory) on `stream` with `attr`.
fn launch_config(grid: (u32, u32, u32), threads: usize, stream: sys::CUstream, attr: &mut sys::CUlaunchAttribute) -> sys::CUlaunchConfig {
    sys::CUlaunchConfig {
        gridDimX: grid.0,
        gridDimY: grid.1,
        gridDimZ: grid.2,
        blockDimX: threads as u32,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: 0,
        hStream: stream,
        attrs: attr,
        numAttrs: 1,
    }
}

/// For every cluster size n from 2 to `counts.len() - 1` blocks (along x), `counts[n]`: how many
/// such clusters of `func` with `threads` threads per block the device runs at once, from the
/// driver's cluster occupancy (a cluster must fit in one GPC, so clusters hold fewer blocks at
/// once than plain grids can). Sizes above the portable 8 are asked for with the function's
/// non-portable attribute set. 0 where the driver runs none (older arches and drivers).
pub(crate) fn active_clusters(func: &CudaFunction, threads: usize, counts: &mut [usize]) {
    if counts.len() > 9 {
        // Refused by drivers or arches without the attribute: then those sizes' queries say 0.
        let _ = func.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED, 1);
    }
    for (size, count) in counts.iter_mut().enumerate().skip(2) {
        let mut attr = cluster_attribute(size as u32);
        let config = launch_config((size as u32, 1, 1), threads, std::ptr::null_mut(), &mut attr);
        let mut clusters: std::ffi::c_int = 0;
        // SAFETY: `config` and `attr` are live for the call; the driver writes one int.
        let ok = unsafe { sys::cuOccupancyMaxActiveClusters(&mut clusters, func.cu_function(), &config) }.result().is_ok();
        *count = if ok { clusters.max(0) as usize } else { 0 };
    }
}

/// How many blocks of `func` (with `threads` threads and `smem` bytes of dynamic shared memory)
/// one SM holds at once, from the driver's occupancy calculator: what a grid must be a multiple
/// of to fill whole waves. `None` where the driver cannot say.
pub(crate) fn resident_blocks(func: &CudaFunction, threads: usize, smem: usize) -> Option<usize> {
    func.occupancy_max_active_blocks_per_multiprocessor(threads as u32, smem, None)
        .ok()
        .map(|n| n as usize)
        .filter(|&n| n > 0)
}
