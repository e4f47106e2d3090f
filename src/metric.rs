//! Metrics: the `Metric` section, running top-k accuracy and averages of logged values.

use crate::arch::Outputs;
use crate::config::{ConfigResult, Node};
use anyhow::{Context, Result};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use std::collections::BTreeMap;

/// Top-k accuracy counts: per k, the number of samples whose label is among the k largest
/// logits. A row holding any non-finite logit (NaN or ±infinity) is never correct, whatever its
/// label's logit: with NaN no logit compares greater than the label's, so the label would rank
/// first, and a diverged model would score perfectly. [`non_finite_rows`] counts those rows.
pub fn topk_correct<B: Backend>(
    logits: Tensor<B, 2>,
    labels: Tensor<B, 1, Int>,
    ks: &[usize],
) -> Vec<usize> {
    let [n, c] = logits.dims();
    let non_finite = non_finite_row_flags(logits.clone());
    let target = logits.clone().gather(1, labels.reshape([n, 1]));
    // Rank of the label = number of logits strictly greater than it (ties count in its favour).
    let rank: Vec<i64> = logits
        .greater(target.expand([n, c]))
        .int()
        .sum_dim(1)
        .into_data()
        .convert::<i64>()
        .to_vec::<i64>()
        .expect("int data");
    ks.iter()
        .map(|&k| {
            rank.iter()
                .zip(&non_finite)
                .filter(|&(&r, &bad)| !bad && (r as usize) < k)
                .count()
        })
        .collect()
}

/// Per row of `logits`: whether it holds a NaN or an infinity.
pub fn non_finite_row_flags<B: Backend>(logits: Tensor<B, 2>) -> Vec<bool> {
    logits
        .is_finite()
        .bool_not()
        .int()
        .sum_dim(1)
        .into_data()
        .convert::<i64>()
        .to_vec::<i64>()
        .expect("int data")
        .into_iter()
        .map(|bad| bad > 0)
        .collect()
}

/// The number of rows of `logits` (samples) that hold a NaN or an infinity.
pub fn non_finite_rows<B: Backend>(logits: Tensor<B, 2>) -> usize {
    non_finite_row_flags(logits)
        .into_iter()
        .filter(|&b| b)
        .count()
}

/// A `Metric.Train` / `Metric.Eval` entry: `TopkAcc` or `DistillationTopkAcc`.
#[derive(Clone, Debug)]
pub struct MetricSpec {
    /// `None` for a plain TopkAcc (single model).
    pub model_key: Option<String>,
    pub topk: Vec<usize>,
}

impl MetricSpec {
    /// The entries of a `Metric.Train` or `Metric.Eval` list.
    pub fn list(n: &Node) -> ConfigResult<Vec<MetricSpec>> {
        n.items()?
            .iter()
            .map(|e| {
                let (name, p) = e.single_key_entry()?;
                match name.as_str() {
                    "DistillationTopkAcc" | "TopkAcc" => Ok(MetricSpec {
                        model_key: p.str("model_key")?,
                        topk: topk(&p)?,
                    }),
                    other => Err(e.error(format!(
                        "unknown metric {other:?}; known: TopkAcc, DistillationTopkAcc"
                    ))),
                }
            })
            .collect()
    }
}

/// `topk`: one or more k of at least 1 (default `[1, 5]`).
fn topk(p: &Node) -> ConfigResult<Vec<usize>> {
    let Some(ks) = p.usize_list("topk")? else {
        return Ok(vec![1, 5]);
    };
    if ks.is_empty() || ks.contains(&0) {
        return Err(p
            .require("topk")?
            .error(format!("expected one or more k of at least 1, got {ks:?}")));
    }
    Ok(ks)
}

/// Running averages of named values, weighted by batch size (PaddleClas's `AverageMeter`).
#[derive(Clone, Debug, Default)]
pub struct Averages {
    sums: BTreeMap<String, (f64, usize)>,
    order: Vec<String>,
}

impl Averages {
    pub fn add(&mut self, name: &str, value: f64, n: usize) {
        let e = self.sums.entry(name.to_string()).or_insert_with(|| {
            self.order.push(name.to_string());
            (0.0, 0)
        });
        e.0 += value * n as f64;
        e.1 += n;
    }

    pub fn get(&self, name: &str) -> Option<f64> {
        self.sums
            .get(name)
            .filter(|(_, n)| *n > 0)
            .map(|(s, n)| s / *n as f64)
    }

    /// `(name, average)` in insertion order.
    pub fn items(&self) -> Vec<(String, f64)> {
        self.order
            .iter()
            .filter_map(|k| self.get(k).map(|v| (k.clone(), v)))
            .collect()
    }

    /// Raw `(sum, count)` pairs, for reducing across ranks.
    pub fn raw(&self) -> Vec<(String, f64, usize)> {
        self.order
            .iter()
            .map(|k| (k.clone(), self.sums[k].0, self.sums[k].1))
            .collect()
    }

    pub fn format(&self, decimals: usize) -> String {
        self.items()
            .iter()
            .map(|(k, v)| format!("{k}: {v:.decimals$}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Metric specs, defaulting to top-1/top-5 of the inference model.
pub fn metric_specs(specs: &[MetricSpec], infer_model: &str) -> Vec<(String, Vec<usize>)> {
    if specs.is_empty() {
        return vec![(infer_model.to_string(), vec![1, 5])];
    }
    specs
        .iter()
        .map(|m| {
            (
                m.model_key
                    .clone()
                    .unwrap_or_else(|| infer_model.to_string()),
                m.topk.clone(),
            )
        })
        .collect()
}

/// Adds top-k accuracies of `logits` to `avg`; the first metric's names are `top{k}`, later ones
/// are prefixed with their model (`Teacher_top1`).
pub fn add_topk<B: Backend>(
    avg: &mut Averages,
    outputs: &Outputs<B>,
    labels: &Tensor<B, 1, Int>,
    specs: &[(String, Vec<usize>)],
) -> Result<()> {
    for (i, (model, ks)) in specs.iter().enumerate() {
        let out = outputs
            .get(model)
            .with_context(|| format!("Metric: no model named {model:?}"))?;
        let n = labels.dims()[0];
        let correct = topk_correct(out.logits.clone(), labels.clone(), ks);
        for (k, c) in ks.iter().zip(correct) {
            let name = if i == 0 {
                format!("top{k}")
            } else {
                format!("{model}_top{k}")
            };
            avg.add(&name, c as f64 / n as f64, n);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_yaml;
    use std::path::Path;

    fn metrics(yaml: &str) -> (Node, ConfigResult<Vec<MetricSpec>>) {
        let root = Node::root(
            parse_yaml(yaml, Path::new("m.yaml")).unwrap(),
            Path::new("m.yaml"),
        );
        let specs = MetricSpec::list(&root.require("Metric").unwrap().require("Eval").unwrap());
        (root, specs)
    }

    #[test]
    fn topk_must_hold_positive_ks() {
        for (list, idx) in [("[1, 0]", 0), ("[]", 0), ("[-1]", 0)] {
            let yaml = format!("Metric: {{Eval: [{{TopkAcc: {{topk: {list}}}}}]}}");
            let e = metrics(&yaml).1.unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("m.yaml: Metric.Eval[{idx}].TopkAcc.topk")),
                "{e}"
            );
        }
    }

    #[test]
    fn an_unknown_metric_key_is_reported() {
        let (root, specs) =
            metrics("Metric: {Eval: [{DistillationTopkAcc: {model_key: Student, top_k: [1]}}]}");
        assert_eq!(specs.unwrap()[0].topk, [1, 5]);
        let report: Vec<String> = root.unread_keys().iter().map(|k| k.to_string()).collect();
        assert_eq!(
            report,
            ["m.yaml: Metric.Eval[0].DistillationTopkAcc.top_k: unknown key, ignored; did you mean `Metric.Eval[0].DistillationTopkAcc.topk`?"]
        );
    }

    #[test]
    fn a_row_with_a_non_finite_logit_is_never_correct() {
        use burn::backend::Flex;
        let d = Default::default();
        let nan = f32::NAN;
        let inf = f32::INFINITY;
        let logits = Tensor::<Flex, 2>::from_floats(
            [
                [3.0, 1.0, 0.0], // label 0: correct at k = 1
                [nan, nan, nan], // all NaN: nothing compares greater than the label
                [0.0, nan, 1.0], // label 2 is the largest finite logit
                [inf, 1.0, 0.0], // label 0 is +inf
                [1.0, 2.0, 3.0], // label 0 ranks third: correct only at k = 3
            ],
            &d,
        );
        let labels = Tensor::<Flex, 1, Int>::from_ints([0, 1, 2, 0, 0], &d);
        assert_eq!(topk_correct(logits.clone(), labels, &[1, 2, 3]), [1, 1, 2]);
        assert_eq!(
            non_finite_row_flags(logits.clone()),
            [false, true, true, true, false]
        );
        assert_eq!(non_finite_rows(logits), 3);
    }

    #[test]
    fn averages_weight_by_count() {
        let mut a = Averages::default();
        a.add("top1", 1.0, 3);
        a.add("top1", 0.0, 1);
        a.add("loss", 2.0, 4);
        assert_eq!(a.get("top1"), Some(0.75));
        assert_eq!(a.format(2), "top1: 0.75, loss: 2.00");
    }
}
