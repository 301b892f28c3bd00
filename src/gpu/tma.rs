//! Tensor maps for Hopper's copy engine (TMA): the descriptors `cuTensorMapEncodeTiled` builds
//! on the host and the warp-specialised flash kernel takes by value. Encoding is pure host work
//! (no device call, no allocation), so it fits inside a graph-captured `forward`.

use cudarc::driver::sys::{
    self, CUresult, CUtensorMapDataType, CUtensorMapFloatOOBfill, CUtensorMapInterleave, CUtensorMapL2promotion,
    CUtensorMapSwizzle,
};

use super::device::device_addr;
use crate::dtype::DType;
use crate::call::Operand;

/// Columns per box: 64 16-bit values, one 128-byte swizzle span.
pub(crate) const BOX_COLS: u32 = 64;

/// A `CUtensorMap` (128 opaque bytes) as the kernel declares it (`AttnTensorMap`).
#[repr(C, align(128))]
#[derive(Clone, Copy)]
pub(crate) struct TensorMap(pub sys::CUtensorMap);

/// A descriptor for one [batch, seq, heads, head_dim] operand, read in boxes of `box_rows` rows
/// × 64 columns of one (batch, head), stored 128-byte swizzled: the layout wgmma's descriptors
/// expect. Rows past the operand's seqlen and columns past its head_dim read as zeros.
///
/// Fails (with the driver's code) where the copy engine cannot address the operand: a base or
/// stride that is not a multiple of 16 bytes, a stride of 2^40 bytes or more, a zero stride
/// (broadcast), or an empty dimension. The caller then runs a kernel that loads with cp.async instead.
pub(crate) fn tile_map(op: &Operand, dtype: DType, box_rows: u32) -> Result<TensorMap, CUresult> {
    let [batch, seqlen, heads, head_dim] = op.layout.shape();
    let data_type = match dtype {
        DType::BF16 => CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        _ => CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
    };
    let elem = dtype.size_bytes() as u64;
    let [s_batch, s_seq, s_head] = op.layout.strides();
    // Innermost first: head_dim (contiguous), seq, heads, batch. Strides of the three outer
    // dimensions, in bytes. A size-1 dimension's stride is never used to step, so any multiple
    // of 16 stands in for whatever the view holds there.
    let stride = |n: usize, s: usize| if n <= 1 { 16 } else { s as u64 * elem };
    let dims: [u64; 4] = [head_dim as u64, seqlen as u64, heads as u64, batch as u64];
    let strides: [u64; 3] = [stride(seqlen, s_seq), stride(heads, s_head), stride(batch, s_batch)];
    // A zero stride on a real dimension (K/V broadcast over the batch or heads) is valid input
    // but not a layout the driver documents for tensor maps: leave it to the cp.async kernel.
    if strides.contains(&0) {
        return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
    }
    let boxes: [u32; 4] = [BOX_COLS, box_rows, 1, 1];
    let element_strides: [u32; 4] = [1; 4];
    let mut map = TensorMap(sys::CUtensorMap { opaque: [0; 16] });
    // SAFETY: every pointer refers to a live local array of the rank (4, 3 for strides) the call
    // reads; the map is written in place. The address is only recorded, never dereferenced here.
    let code = unsafe {
        sys::cuTensorMapEncodeTiled(
            &mut map.0,
            data_type,
            4,
            device_addr(op) as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            element_strides.as_ptr(),
            CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    match code {
        CUresult::CUDA_SUCCESS => Ok(map),
        e => Err(e),
    }
}
