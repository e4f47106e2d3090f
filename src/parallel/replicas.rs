//! Keeping data-parallel replicas identical: rank 0's initial weights and buffers broadcast to
//! all, gradients all-reduced (mean) as a few large flat buckets, and BatchNorm running
//! statistics averaged before anything reads them (eval, checkpoints).
//!
//! Averaging running statistics is exact, not an approximation: each rank's running mean is
//! an exponential average of its own batch means, and averages are linear, so the mean of
//! the ranks' running statistics is the running statistic of the ranks' mean batch
//! statistics — what one worker with `Global.bn_stat_splits = world` computes.

use super::Collective;
use anyhow::Result;
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use std::time::{Duration, Instant};

use super::flat::FlatLayout;
pub use super::flat::BUCKET_FLOATS;

/// Where the time of one synchronisation went.
#[derive(Clone, Copy, Debug, Default)]
pub struct SyncCost {
    /// Moving tensors to and from the flat buffer.
    pub copy: Duration,
    /// Inside the collective.
    pub reduce: Duration,
    /// Floats exchanged.
    pub floats: usize,
}

fn in_buckets(
    buf: &mut [f32],
    coll: &mut dyn Collective,
    mut op: impl FnMut(&mut dyn Collective, &mut [f32]) -> Result<()>,
) -> Result<()> {
    for range in super::flat::buckets(buf.len(), BUCKET_FLOATS) {
        op(coll, &mut buf[range])?;
    }
    Ok(())
}

fn host_floats<B: Backend, const D: usize>(t: Tensor<B, D>, out: &mut Vec<f32>) {
    let data = t.into_data().convert::<f32>();
    out.extend_from_slice(data.as_slice::<f32>().expect("converted to f32"));
}

/// Gradients of a module's parameters, taken out of `grads` in visiting order, flattened
/// (a reshape: no copy).
struct TakeGrads<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    taken: Vec<(ParamId, Vec<usize>, Tensor<B::InnerBackend, 1>)>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for TakeGrads<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            let dims = g.dims().to_vec();
            let len: usize = dims.iter().product();
            self.taken.push((param.id, dims, g.reshape([len])));
        }
    }
}
/// The gradients in `grads` of one module's parameters, flattened (clones share the storage).
struct PeekGrads<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    flat: Vec<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for PeekGrads<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
            let len = g.shape().num_elements();
            self.flat.push(g.reshape([len]));
        }
    }
}

/// Whether a gradient in `grads` of `module`'s parameters holds a NaN or an infinity, checked
/// where the gradients are ([`device_tensors_hold_non_finite`]).
pub fn grads_hold_non_finite<B: AutodiffBackend, M: Module<B>>(
    module: &M,
    grads: &GradientsParams,
) -> bool {
    let mut peek = PeekGrads::<B> {
        grads,
        flat: vec![],
    };
    module.visit(&mut peek);
    device_tensors_hold_non_finite(peek.flat)
}

/// Whether one of `tensors` holds a NaN or an infinity, checked on their device: one sum per
/// tensor, read back together; a tensor whose sum is not finite is confirmed value by value,
/// since finite values may overflow a sum.
fn device_tensors_hold_non_finite<B: Backend>(tensors: Vec<Tensor<B, 1>>) -> bool {
    if tensors.is_empty() {
        return false;
    }
    let sums: Vec<Tensor<B, 1>> = tensors.iter().map(|g| g.clone().sum()).collect();
    let sums: Vec<f32> = Tensor::cat(sums, 0)
        .into_data()
        .convert::<f32>()
        .to_vec()
        .expect("f32 data");
    sums.iter().zip(tensors).any(|(s, g)| {
        !s.is_finite()
            && holds_non_finite(
                g.into_data()
                    .convert::<f32>()
                    .as_slice::<f32>()
                    .expect("f32 data"),
            )
    })
}

/// Whether `values` holds a NaN or an infinity: whether the largest magnitude, compared as
/// bits, reaches infinity's (NaNs lie above it); an integer maximum the compiler vectorises.
fn holds_non_finite(values: &[f32]) -> bool {
    const INFINITY_BITS: u32 = 0x7f80_0000;
    values
        .chunks(1 << 16)
        .any(|c| c.iter().map(|v| v.to_bits() & 0x7fff_ffff).max() >= Some(INFINITY_BITS))
}

/// All-reduces the gradients in `grads` (mean over ranks) and `extra` (sum; e.g. stop flags).
///
/// The gradients are laid back to back in one flat tensor on their device ([`FlatLayout`]; one
/// device copy), reduced in [`BUCKET_FLOATS`]-sized buckets, scaled by `1 / world` there, and
/// handed back as views of it. Where the collective reaches device memory (NCCL with burn-cuda)
/// the buffer is reduced in place and `extra` travels alone through the host (a few floats);
/// elsewhere the buffer is read back once, reduced on the host with `extra` appended, and
/// uploaded once.
///
/// With `non_finite_slot`, `extra[slot]` is set to 1 before the reduce when this rank's own
/// gradients hold a NaN or an infinity, so every rank learns which ranks' did: a finite loss can
/// still have non-finite gradients (a square root or a norm at 0), and a mean with one
/// infinity poisons every replica's weights. Through the host the check is one pass over the
/// buffer read back anyway; on the device it is [`device_tensors_hold_non_finite`] (one sum, one
/// read-back of a float). Measured on the CPU with ResNet50's 25.6M gradients: 15–20 ms on the
/// host (beside the 120 ms copy into the buffer), 10 ms on the device, against 2 s for the
/// forward and backward pass of 8 images at 112×112: under 1 % of a step.
pub fn all_reduce_grads<B: AutodiffBackend, M: Module<B>>(
    module: &M,
    grads: &mut GradientsParams,
    extra: &mut [f32],
    non_finite_slot: Option<usize>,
    coll: &mut dyn Collective,
) -> Result<SyncCost> {
    let world = coll.world_size();
    if world == 1 && !coll.reduces_alone() {
        if let Some(slot) = non_finite_slot {
            extra[slot] = grads_hold_non_finite(module, grads) as u8 as f32;
        }
        return Ok(SyncCost::default());
    }
    let t0 = Instant::now();
    let mut take = TakeGrads::<B> {
        grads,
        taken: vec![],
    };
    module.visit(&mut take);
    let TakeGrads { grads, taken } = take;
    let layout = FlatLayout::new(taken.iter().map(|(_, _, g)| g.dims()[0]));
    let Some(device) = taken.first().map(|(_, _, g)| g.device()) else {
        // Nothing trainable here: only `extra` travels.
        if let Some(slot) = non_finite_slot {
            extra[slot] = 0.0;
        }
        coll.all_reduce_sum(extra)?;
        return Ok(SyncCost {
            reduce: t0.elapsed(),
            floats: extra.len(),
            ..SyncCost::default()
        });
    };
    let flat = Tensor::cat(taken.iter().map(|(_, _, g)| g.clone()).collect(), 0);
    let (reduced, t1, t2) = if coll.can_reduce_on_device(&flat) {
        if let Some(slot) = non_finite_slot {
            extra[slot] = device_tensors_hold_non_finite(vec![flat.clone()]) as u8 as f32;
        }
        let t1 = Instant::now();
        coll.all_reduce_sum_on_device(&flat, &layout.buckets(BUCKET_FLOATS))?;
        coll.all_reduce_sum(extra)?;
        (flat, t1, Instant::now())
    } else {
        let mut host: Vec<f32> = flat
            .into_data()
            .convert::<f32>()
            .into_vec()
            .expect("f32 data");
        if let Some(slot) = non_finite_slot {
            extra[slot] = holds_non_finite(&host) as u8 as f32;
        }
        host.extend_from_slice(extra);
        let t1 = Instant::now();
        in_buckets(&mut host, coll, |c, b| c.all_reduce_sum(b))?;
        let t2 = Instant::now();
        extra.copy_from_slice(&host[layout.len()..]);
        host.truncate(layout.len());
        let reduced = Tensor::from_data(TensorData::new(host, [layout.len()]), &device);
        (reduced, t1, t2)
    };
    let mean = if world > 1 {
        reduced.mul_scalar(1.0 / world as f32)
    } else {
        reduced
    };
    for ((id, dims, _), range) in taken.into_iter().zip(&layout.ranges) {
        register::<B::InnerBackend>(grads, id, mean.clone().slice([range.clone()]), dims);
    }
    Ok(SyncCost {
        copy: (t1 - t0) + t2.elapsed(),
        reduce: t2 - t1,
        floats: layout.len() + extra.len(),
    })
}

/// Registers `flat` as the gradient of shape `dims` (burn's tensors carry their rank in the
/// type).
fn register<B: Backend>(
    grads: &mut GradientsParams,
    id: ParamId,
    flat: Tensor<B, 1>,
    dims: Vec<usize>,
) {
    macro_rules! reg {
        ($($d:literal)*) => {
            match dims.len() {
                $($d => {
                    let shape: [usize; $d] = dims.try_into().expect("rank checked");
                    grads.register::<B, $d>(id, flat.reshape(shape))
                })*
                d => panic!("gradient of rank {d}: not supported"),
            }
        };
    }
    reg!(1 2 3 4 5 6);
}

/// Every float tensor of a module (parameters and running statistics), flattened in visiting
/// order; `only` filters by field name (`running_mean`, ...).
struct Gather {
    flat: Vec<f32>,
    path: Vec<String>,
    only: Option<&'static [&'static str]>,
}

impl Gather {
    fn selected(&self) -> bool {
        match self.only {
            None => true,
            Some(names) => self
                .path
                .last()
                .is_some_and(|n| names.contains(&n.as_str())),
        }
    }
}

impl<B: Backend> ModuleVisitor<B> for Gather {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if self.selected() {
            host_floats(param.val(), &mut self.flat);
        }
    }
}

/// Writes [`Gather`]'s flat buffer back, in the same order and with the same filter.
struct Scatter {
    flat: Vec<f32>,
    offset: usize,
    path: Vec<String>,
    only: Option<&'static [&'static str]>,
}

impl<B: Backend> ModuleMapper<B> for Scatter {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let selected = match self.only {
            None => true,
            Some(names) => self
                .path
                .last()
                .is_some_and(|n| names.contains(&n.as_str())),
        };
        let (id, tensor, mapper) = param.consume();
        if !selected {
            return Param::from_mapped_value(id, tensor, mapper);
        }
        let shape = tensor.dims();
        let len: usize = shape.iter().product();
        let values = self.flat[self.offset..self.offset + len].to_vec();
        self.offset += len;
        let mut fresh = Tensor::<B, D>::from_data(TensorData::new(values, shape), &tensor.device());
        if tensor.is_require_grad() {
            fresh = fresh.require_grad();
        }
        Param::from_mapped_value(id, fresh, mapper)
    }
}

/// The names of BatchNorm's running statistics (the module fields of `layers::BatchNorm2d`).
const RUNNING_STATS: &[&str] = &["running_mean", "running_var"];

fn exchange<B: Backend, M: Module<B>>(
    module: M,
    only: Option<&'static [&'static str]>,
    coll: &mut dyn Collective,
    op: impl FnMut(&mut dyn Collective, &mut [f32]) -> Result<()>,
) -> Result<M> {
    if coll.world_size() == 1 {
        return Ok(module);
    }
    let mut gather = Gather {
        flat: vec![],
        path: vec![],
        only,
    };
    module.visit(&mut gather);
    let mut flat = gather.flat;
    in_buckets(&mut flat, coll, op)?;
    let mut scatter = Scatter {
        flat,
        offset: 0,
        path: vec![],
        only,
    };
    let module = module.map(&mut scatter);
    debug_assert_eq!(scatter.offset, scatter.flat.len());
    Ok(module)
}

/// Replaces every parameter and buffer of `module` with rank 0's.
pub fn broadcast_from_main<B: Backend, M: Module<B>>(
    module: M,
    coll: &mut dyn Collective,
) -> Result<M> {
    exchange(module, None, coll, |c, b| c.broadcast(b, 0))
}

/// Replaces BatchNorm running statistics by their mean over ranks.
pub fn average_running_stats<B: Backend, M: Module<B>>(
    module: M,
    coll: &mut dyn Collective,
) -> Result<M> {
    exchange(module, Some(RUNNING_STATS), coll, |c, b| {
        c.all_reduce_mean(b)
    })
}

/// A 64-bit FNV-1a hash of every float of `module` (parameters and buffers), bit for bit.
pub fn fingerprint<B: Backend, M: Module<B>>(module: &M) -> u64 {
    let mut gather = Gather {
        flat: vec![],
        path: vec![],
        only: None,
    };
    module.visit(&mut gather);
    gather.flat.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, v| {
        v.to_bits().to_le_bytes().iter().fold(h, |h, b| {
            (h ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3)
        })
    })
}

/// Fails unless `module` is bit for bit the same on every rank as on rank 0; returns its
/// fingerprint. Replicas that drift apart would train silently wrong, so this runs after
/// every epoch.
pub fn check_identical<B: Backend, M: Module<B>>(
    module: &M,
    coll: &mut dyn Collective,
) -> Result<u64> {
    let mine = fingerprint(module);
    if coll.world_size() == 1 {
        return Ok(mine);
    }
    let mut main = mine.to_le_bytes();
    coll.broadcast_bytes(&mut main, 0)?;
    let main = u64::from_le_bytes(main);
    if main != mine {
        anyhow::bail!(
            "rank {}: the model replica differs from rank 0's (fingerprint {mine:016x} vs {main:016x}): \
             the ranks' collectives disagree",
            coll.rank()
        );
    }
    Ok(mine)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::layers::{BatchNorm2d, BnMode};
    use crate::parallel::tcp::TcpCollective;
    use burn::backend::{Autodiff, Flex};
    use std::time::Duration;

    type Ad = Autodiff<Flex>;

    fn on_two_ranks<T: Send + 'static>(
        f: impl Fn(TcpCollective) -> T + Send + Sync + Clone + 'static,
    ) -> Vec<T> {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string();
        let hs: Vec<_> = (0..2)
            .map(|r| {
                let (addr, f) = (addr.clone(), f.clone());
                std::thread::spawn(move || {
                    f(TcpCollective::connect(&addr, r, 2, Duration::from_secs(20)).unwrap())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    }

    fn floats<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
        t.into_data().convert::<f32>().to_vec().unwrap()
    }

    /// A BatchNorm whose weights and statistics depend on `r`, trained one step on `r`'s data.
    fn bn_for_rank(r: usize) -> (BatchNorm2d<Ad>, Tensor<Ad, 1>) {
        let dev = Default::default();
        let mut bn = BatchNorm2d::<Ad>::new(3, &dev);
        bn.weight = Param::from_tensor(Tensor::from_floats([1.0 + r as f32, 2.0, 3.0], &dev));
        let x = Tensor::<Ad, 4>::from_data(
            TensorData::new(
                (0..24)
                    .map(|i| (i * (r + 1)) as f32 * 0.1)
                    .collect::<Vec<_>>(),
                [2, 3, 2, 2],
            ),
            &dev,
        );
        let y = bn.forward(x, BnMode::Train).sum();
        (bn, y.reshape([1]))
    }

    #[test]
    fn broadcast_makes_replicas_identical_and_keeps_trainability() {
        let out = on_two_ranks(|mut c| {
            let (bn, _) = bn_for_rank(c.rank());
            let bn = broadcast_from_main(bn, &mut c).unwrap();
            assert!(bn.weight.val().is_require_grad());
            (
                floats(bn.weight.val()),
                floats(bn.running_mean.value()),
                floats(bn.running_var.value()),
            )
        });
        assert_eq!(out[0], out[1]);
        assert_eq!(out[0].0, vec![1.0, 2.0, 3.0], "rank 0's weights win");
        assert_ne!(
            out[0].1,
            vec![0.0; 3],
            "running stats are broadcast after the update"
        );
    }

    #[test]
    fn running_stats_are_averaged_and_weights_left_alone() {
        let out = on_two_ranks(|mut c| {
            let (bn, _) = bn_for_rank(c.rank());
            let before = floats(bn.running_mean.value());
            let bn = average_running_stats(bn, &mut c).unwrap();
            (
                before,
                floats(bn.running_mean.value()),
                floats(bn.weight.val()),
            )
        });
        let expect: Vec<f32> = out[0]
            .0
            .iter()
            .zip(&out[1].0)
            .map(|(a, b)| (a + b) / 2.0)
            .collect();
        for (i, o) in out.iter().enumerate() {
            assert_eq!(o.1, expect);
            assert_eq!(o.2[0], 1.0 + i as f32, "weights are not averaged");
        }
    }

    #[test]
    fn differing_replicas_are_detected() {
        let out = on_two_ranks(|mut c| {
            let (bn, _) = bn_for_rank(c.rank());
            let differing = check_identical(&bn, &mut c).map_err(|e| e.to_string());
            let bn = broadcast_from_main(bn, &mut c).unwrap();
            let same = check_identical(&bn, &mut c).unwrap();
            (differing, same)
        });
        assert!(out[0].0.is_ok());
        assert!(
            out[1]
                .0
                .as_ref()
                .unwrap_err()
                .contains("differs from rank 0"),
            "{:?}",
            out[1].0
        );
        assert_eq!(out[0].1, out[1].1);
    }

    #[test]
    fn gradients_are_averaged_and_extras_summed() {
        let out = on_two_ranks(|mut c| {
            let (bn, y) = bn_for_rank(c.rank());
            let loss = y.mul_scalar(c.rank() as f32 + 1.0);
            let mut grads = GradientsParams::from_grads(loss.backward(), &bn);
            let own: Vec<f32> = floats(grads.get::<Flex, 1>(bn.bias.id).unwrap());
            let mut extra = [c.rank() as f32 + 1.0];
            all_reduce_grads(&bn, &mut grads, &mut extra, None, &mut c).unwrap();
            (
                own,
                floats(grads.get::<Flex, 1>(bn.bias.id).unwrap()),
                extra[0],
            )
        });
        for o in &out {
            let mean: Vec<f32> = out[0]
                .0
                .iter()
                .zip(&out[1].0)
                .map(|(a, b)| (a + b) / 2.0)
                .collect();
            assert_eq!(o.1, mean);
            assert_eq!(o.2, 3.0);
        }
        assert_ne!(out[0].0, out[1].0, "the ranks' own gradients differ");
    }

    /// The gradients in `grads` of `module`'s parameters, in visiting order, with their shapes.
    struct ReadGrads<'a> {
        grads: &'a GradientsParams,
        out: Vec<(Vec<usize>, Vec<f32>)>,
    }

    impl ModuleVisitor<Ad> for ReadGrads<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<Ad, D>>) {
            if let Some(g) = self.grads.get::<Flex, D>(param.id) {
                self.out.push((g.dims().to_vec(), floats(g)));
            }
        }
    }

    fn read_grads(
        module: &impl Module<Ad>,
        grads: &GradientsParams,
    ) -> Vec<(Vec<usize>, Vec<f32>)> {
        let mut read = ReadGrads { grads, out: vec![] };
        module.visit(&mut read);
        read.out
    }

    /// A convolution's 4-D weight and BatchNorm's 1-D ones go through the flat buffer and come
    /// back as the mean of the ranks' own gradients, each in its own shape.
    #[test]
    fn gradients_of_every_shape_come_back_averaged_in_their_shapes() {
        use crate::nn::layers::Act;
        use crate::nn::layers::ConvBn;
        let out = on_two_ranks(|mut c| {
            let dev = Default::default();
            let block = ConvBn::<Ad>::new(2, 3, 3, 1, Act::Relu, &dev);
            let x = Tensor::<Ad, 4>::random(
                [2, 2, 5, 5],
                burn::tensor::Distribution::Normal(c.rank() as f64, 1.0),
                &dev,
            );
            let loss = block.forward(x, BnMode::Train).powi_scalar(2).sum();
            let mut grads = GradientsParams::from_grads(loss.backward(), &block);
            let own = read_grads(&block, &grads);
            all_reduce_grads(&block, &mut grads, &mut [], None, &mut c).unwrap();
            (own, read_grads(&block, &grads))
        });
        let (own0, own1) = (&out[0].0, &out[1].0);
        assert_eq!(
            own0.iter().map(|(d, _)| d.clone()).collect::<Vec<_>>(),
            vec![vec![3, 2, 3, 3], vec![3], vec![3]],
            "conv weight, BatchNorm weight and bias"
        );
        for (_, reduced) in &out {
            assert_eq!(reduced.len(), own0.len());
            for (((dims, got), (d0, g0)), (_, g1)) in reduced.iter().zip(own0).zip(own1) {
                assert_eq!(dims, d0);
                let mean: Vec<f32> = g0.iter().zip(g1).map(|(a, b)| (a + b) / 2.0).collect();
                assert_eq!(got, &mean);
            }
        }
    }

    #[test]
    fn non_finite_values_are_found_by_their_bits() {
        assert!(!holds_non_finite(&[f32::MAX, -f32::MAX, 0.0, -0.0]));
        for bad in [f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut v = vec![1.0; 100_000];
            v[70_000] = bad;
            assert!(holds_non_finite(&v), "{bad}");
        }
    }

    /// Gradients of `bn` from a loss whose gradient is `g` everywhere (bias: `g` per channel).
    fn grads_of(bn: &BatchNorm2d<Ad>, g: f32) -> GradientsParams {
        let loss = bn.bias.val().sum().mul_scalar(g);
        GradientsParams::from_grads(loss.backward(), bn)
    }

    #[test]
    fn non_finite_gradients_are_voted_by_the_rank_that_has_them() {
        // Two ranks: rank 1's gradients hold an infinity; both learn that rank 1's did.
        let out = on_two_ranks(|mut c| {
            let (bn, _) = bn_for_rank(0);
            let g = if c.rank() == 1 { f32::INFINITY } else { 1.0 };
            let mut grads = grads_of(&bn, g);
            let mut votes = [0.0; 3];
            let slot = 1 + c.rank();
            all_reduce_grads(&bn, &mut grads, &mut votes, Some(slot), &mut c).unwrap();
            votes
        });
        assert_eq!(out[0], [0.0, 0.0, 1.0]);
        assert_eq!(out[1], out[0]);
        // One process: checked on the device.
        let mut single = crate::parallel::SingleProcess;
        for (g, expect) in [(1.0, 0.0), (f32::NAN, 1.0), (3e38, 0.0)] {
            let (bn, _) = bn_for_rank(0);
            let mut grads = grads_of(&bn, g);
            let mut votes = [0.0; 2];
            all_reduce_grads(&bn, &mut grads, &mut votes, Some(1), &mut single).unwrap();
            assert_eq!(votes, [0.0, expect], "gradient {g}");
        }
    }
}
