//! TEMPORARY stub until helper-cpu lands.
use crate::{Element, Layout};
pub(crate) struct HostIn<'a, T> { pub data: &'a [T], pub layout: Layout }
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward<T: Element>(_q: HostIn<'_, T>, _k: HostIn<'_, T>, _v: HostIn<'_, T>, _out: &mut [T], _ol: Layout, _lse: Option<&mut [f32]>, _scale: f32, _causal: bool, _threads: usize) {}
