//! Non-finite values (NaN, ±infinity) in weights and outputs: found cheaply (one sum on the
//! device per tensor: a finite sum proves every value finite) and confirmed value by value on
//! the host only when a sum is not finite, so huge but finite values are not called NaN.
//! Diverged weights must never reach a metric, a checkpoint or an export.

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Tensor};

/// A tensor holding NaN or infinite values.
#[derive(Clone, Debug, PartialEq)]
pub struct NonFiniteTensor {
    /// Its dotted field path (`ResNet.stages.0.0.conv1.weight`), prefixed by its model's key
    /// where [`describe`]'s caller adds one.
    pub name: String,
    /// Values that are NaN or infinite.
    pub non_finite: usize,
    pub len: usize,
}

/// Whether `t` holds a NaN or an infinity.
pub fn any_non_finite<B: Backend, const D: usize>(t: Tensor<B, D>) -> bool {
    count_non_finite(t) > 0
}

/// How many values of `t` are NaN or infinite.
pub fn count_non_finite<B: Backend, const D: usize>(t: Tensor<B, D>) -> usize {
    let sum: f32 = t.clone().sum().into_scalar().elem();
    if sum.is_finite() {
        return 0;
    }
    t.into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("f32 data")
        .iter()
        .filter(|v| !v.is_finite())
        .count()
}

struct Find {
    path: Vec<String>,
    found: Vec<NonFiniteTensor>,
}

impl<B: Backend> ModuleVisitor<B> for Find {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
        let t = p.val();
        let len = t.shape().num_elements();
        let non_finite = count_non_finite(t);
        if non_finite > 0 {
            self.found.push(NonFiniteTensor {
                name: self.path.join("."),
                non_finite,
                len,
            });
        }
    }
}

/// Every float tensor of `module` (parameters and BatchNorm running statistics) that holds a
/// NaN or an infinity, in visiting order.
pub fn non_finite_tensors<B: Backend, M: Module<B>>(module: &M) -> Vec<NonFiniteTensor> {
    let mut find = Find {
        path: vec![],
        found: vec![],
    };
    module.visit(&mut find);
    find.found
}

/// `ResNet.fc.bias (3 of 3 values), …` — the first few, and how many more.
pub fn describe(tensors: &[NonFiniteTensor]) -> String {
    const SHOWN: usize = 3;
    let mut s = tensors
        .iter()
        .take(SHOWN)
        .map(|t| format!("{} ({} of {} values)", t.name, t.non_finite, t.len))
        .collect::<Vec<_>>()
        .join(", ");
    if tensors.len() > SHOWN {
        s.push_str(&format!(" and {} more tensors", tensors.len() - SHOWN));
    }
    s
}

/// `rank 1`, `ranks 0 and 2`, `all 8 ranks`: which of `world` ranks `ranks` are.
pub fn ranks_phrase(ranks: &[usize], world: usize) -> String {
    match ranks {
        [r] => format!("rank {r}"),
        _ if ranks.len() == world && world > 2 => format!("all {world} ranks"),
        [init @ .., last] => {
            let init: Vec<String> = init.iter().map(usize::to_string).collect();
            format!("ranks {} and {last}", init.join(", "))
        }
        [] => "no rank".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn huge_finite_values_are_not_called_non_finite() {
        let d = Default::default();
        // Their sum overflows to infinity; every value is finite.
        let big = Tensor::<Flex, 1>::from_floats([3e38, 3e38, 1.0], &d);
        assert!(!any_non_finite(big));
        let t = Tensor::<Flex, 2>::from_floats([[1.0, f32::NAN], [f32::INFINITY, 2.0]], &d);
        assert_eq!(count_non_finite(t), 2);
    }

    #[test]
    fn ranks_are_listed_in_words() {
        assert_eq!(ranks_phrase(&[1], 2), "rank 1");
        assert_eq!(ranks_phrase(&[0, 1], 2), "ranks 0 and 1");
        assert_eq!(ranks_phrase(&[0, 2, 3], 4), "ranks 0, 2 and 3");
        assert_eq!(ranks_phrase(&[0, 1, 2], 3), "all 3 ranks");
    }
}
