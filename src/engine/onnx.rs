//! ONNX export of a backbone (opset 17): the graph is written from the module tree, in the same
//! order as the backbone's `forward` in evaluation mode, with every BatchNorm folded into the
//! convolution before it and Paddle's inference-time dropout scaling folded into the classifier.
//! Outputs `logits` and `scores` (softmax); the preprocessing travels as metadata.
//!
//! The protobuf encoding is written here (the few ONNX messages needed), so no code generator or
//! protobuf runtime is involved.

use crate::arch::mobilenet_v3::MobileNetV3;
use crate::arch::pplcnet::PPLCNet;
use crate::arch::resnet::ResNet;
use crate::arch::Backbone;
use crate::nn::layers::{Act, ConvBn, SeModule};
use anyhow::{bail, Result};
use burn::module::Param;
use burn::nn::conv::Conv2d;
use burn::nn::{Linear, PaddingConfig2d};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

pub const OPSET: i64 = 17;
/// ONNX IR version 8 (ONNX 1.10+); with opset 17 the model needs onnxruntime 1.12 or later.
const IR_VERSION: i64 = 8;

/// A protobuf message being written.
#[derive(Default)]
struct Msg(Vec<u8>);

impl Msg {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }
    fn key(&mut self, field: u32, wire: u32) {
        self.varint(((field << 3) | wire) as u64);
    }
    fn int(mut self, field: u32, v: i64) -> Self {
        self.key(field, 0);
        self.varint(v as u64);
        self
    }
    fn float(mut self, field: u32, v: f32) -> Self {
        self.key(field, 5);
        self.0.extend(v.to_le_bytes());
        self
    }
    fn bytes(mut self, field: u32, b: &[u8]) -> Self {
        self.key(field, 2);
        self.varint(b.len() as u64);
        self.0.extend(b);
        self
    }
    fn str(self, field: u32, s: &str) -> Self {
        self.bytes(field, s.as_bytes())
    }
    fn msg(self, field: u32, m: Msg) -> Self {
        self.bytes(field, &m.0)
    }
}

/// An attribute of a node (AttributeProto).
enum Attr {
    Int(&'static str, i64),
    Ints(&'static str, Vec<i64>),
    Float(&'static str, f32),
}

impl Attr {
    fn encode(&self) -> Msg {
        match self {
            // type: FLOAT = 1, INT = 2, INTS = 7
            Attr::Float(n, v) => Msg::default().str(1, n).float(2, *v).int(20, 1),
            Attr::Int(n, v) => Msg::default().str(1, n).int(3, *v).int(20, 2),
            Attr::Ints(n, v) => v
                .iter()
                .fold(Msg::default().str(1, n), |m, &i| m.int(8, i))
                .int(20, 7),
        }
    }
}

fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("f32 tensor data")
}

fn param<B: Backend, const D: usize>(p: &Param<Tensor<B, D>>) -> Vec<f32> {
    values(p.val())
}

/// The graph under construction: nodes in execution order and the weights they use.
struct Graph {
    nodes: Vec<Msg>,
    initializers: Vec<Msg>,
    count: usize,
}

impl Graph {
    fn name(&mut self, hint: &str) -> String {
        self.count += 1;
        format!("{hint}_{}", self.count)
    }

    fn weight(&mut self, hint: &str, shape: &[usize], values: &[f32]) -> String {
        let name = self.name(hint);
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let t = shape
            .iter()
            .fold(Msg::default(), |m, &d| m.int(1, d as i64))
            .int(2, 1) // FLOAT
            .str(8, &name)
            .bytes(9, &bytes);
        self.initializers.push(t);
        name
    }

    fn node(&mut self, op: &str, inputs: &[&str], attrs: &[Attr]) -> String {
        let out = self.name(&op.to_lowercase());
        self.node_to(op, inputs, attrs, out)
    }

    fn node_to(&mut self, op: &str, inputs: &[&str], attrs: &[Attr], out: String) -> String {
        let mut m = Msg::default();
        for i in inputs {
            m = m.str(1, i);
        }
        m = m.str(2, &out).str(3, &out).str(4, op);
        for a in attrs {
            m = m.msg(5, a.encode());
        }
        self.nodes.push(m);
        out
    }

    fn act(&mut self, x: String, act: Act) -> String {
        match act {
            Act::None => x,
            Act::Relu => self.node("Relu", &[&x], &[]),
            Act::Hardswish => self.node("HardSwish", &[&x], &[]),
        }
    }

    /// A convolution with the given (already folded) weight and bias.
    fn conv_raw<B: Backend>(
        &mut self,
        x: &str,
        conv: &Conv2d<B>,
        weight: Vec<f32>,
        bias: Option<Vec<f32>>,
    ) -> Result<String> {
        let shape = conv.weight.dims();
        let pads = match conv.padding {
            PaddingConfig2d::Valid => [0, 0, 0, 0],
            PaddingConfig2d::Explicit(t, l, b, r) => [t, l, b, r],
            PaddingConfig2d::Same => {
                bail!("ONNX export: `Same` padding is not used by any backbone")
            }
        };
        let w = self.weight("w", &shape, &weight);
        let b = bias.map(|b| self.weight("b", &[shape[0]], &b));
        let mut inputs = vec![x, w.as_str()];
        if let Some(b) = &b {
            inputs.push(b);
        }
        let attrs = [
            Attr::Ints(
                "kernel_shape",
                conv.kernel_size.iter().map(|&k| k as i64).collect(),
            ),
            Attr::Ints("strides", conv.stride.iter().map(|&s| s as i64).collect()),
            Attr::Ints(
                "dilations",
                conv.dilation.iter().map(|&d| d as i64).collect(),
            ),
            Attr::Ints("pads", pads.iter().map(|&p| p as i64).collect()),
            Attr::Int("group", conv.groups as i64),
        ];
        Ok(self.node("Conv", &inputs, &attrs))
    }

    fn conv<B: Backend>(&mut self, x: &str, conv: &Conv2d<B>) -> Result<String> {
        let b = conv.bias.as_ref().map(param);
        self.conv_raw(x, conv, param(&conv.weight), b)
    }

    /// Conv + BatchNorm (folded: `w·γ/σ`, `β − μ·γ/σ`, σ = √(var + ε)) + activation.
    fn conv_bn<B: Backend>(&mut self, x: &str, cb: &ConvBn<B>) -> Result<String> {
        let bn = &cb.bn;
        let gamma = param(&bn.weight);
        let beta = param(&bn.bias);
        let mean = values(bn.running_mean.value_sync());
        let var = values(bn.running_var.value_sync());
        let scale: Vec<f32> = gamma
            .iter()
            .zip(&var)
            .map(|(g, v)| (*g as f64 / (*v as f64 + bn.epsilon).sqrt()) as f32)
            .collect();
        let mut w = param(&cb.conv.weight);
        let per_out = w.len() / scale.len();
        for (o, chunk) in w.chunks_mut(per_out).enumerate() {
            chunk.iter_mut().for_each(|v| *v *= scale[o]);
        }
        let conv_bias = cb.conv.bias.as_ref().map(param);
        let b: Vec<f32> = (0..scale.len())
            .map(|o| beta[o] + (conv_bias.as_ref().map_or(0.0, |cb| cb[o]) - mean[o]) * scale[o])
            .collect();
        let y = self.conv_raw(x, &cb.conv, w, Some(b))?;
        Ok(self.act(y, cb.act))
    }

    fn se<B: Backend>(&mut self, x: &str, se: &SeModule<B>) -> Result<String> {
        let s = self.node("GlobalAveragePool", &[x], &[]);
        let s = self.conv(&s, &se.conv1)?;
        let s = self.node("Relu", &[&s], &[]);
        let s = self.conv(&s, &se.conv2)?;
        let s = self.node(
            "HardSigmoid",
            &[&s],
            &[
                Attr::Float("alpha", se.slope as f32),
                Attr::Float("beta", 0.5),
            ],
        );
        Ok(self.node("Mul", &[x, &s], &[]))
    }

    /// Flatten + Gemm; `scale` multiplies the input (Paddle's eval-time dropout, `1 − p`).
    fn classifier<B: Backend>(&mut self, x: &str, fc: &Linear<B>, scale: f32) -> String {
        let x = self.node("Flatten", &[x], &[Attr::Int("axis", 1)]);
        let [cin, cout] = fc.weight.dims();
        // burn's Linear weight is [in, out]: Gemm without transposition.
        let w = self.weight("fc_w", &[cin, cout], &param(&fc.weight));
        let mut inputs = vec![x.as_str(), w.as_str()];
        let b = fc
            .bias
            .as_ref()
            .map(|b| self.weight("fc_b", &[cout], &param(b)));
        if let Some(b) = &b {
            inputs.push(b);
        }
        self.node("Gemm", &inputs, &[Attr::Float("alpha", scale)])
    }

    fn resnet<B: Backend>(&mut self, x: &str, m: &ResNet<B>) -> Result<String> {
        let mut x = x.to_string();
        for c in &m.stem {
            x = self.conv_bn(&x, c)?;
        }
        if m.max_pool {
            x = self.node(
                "MaxPool",
                &[&x],
                &[
                    Attr::Ints("kernel_shape", vec![3, 3]),
                    Attr::Ints("strides", vec![2, 2]),
                    Attr::Ints("pads", vec![1, 1, 1, 1]),
                ],
            );
        }
        for b in &m.blocks {
            let identity = match &b.short {
                Some(s) if b.short_pool => {
                    // vd: 2×2/2 average pool, ceil mode, padding excluded from the average.
                    let p = self.node(
                        "AveragePool",
                        &[&x],
                        &[
                            Attr::Ints("kernel_shape", vec![2, 2]),
                            Attr::Ints("strides", vec![2, 2]),
                            Attr::Int("ceil_mode", 1),
                            Attr::Int("count_include_pad", 0),
                        ],
                    );
                    self.conv_bn(&p, s)?
                }
                Some(s) => self.conv_bn(&x, s)?,
                None => x.clone(),
            };
            let mut y = self.conv_bn(&x, &b.conv0)?;
            y = self.conv_bn(&y, &b.conv1)?;
            if let Some(c) = &b.conv2 {
                y = self.conv_bn(&y, c)?;
            }
            let sum = self.node("Add", &[&y, &identity], &[]);
            x = self.node("Relu", &[&sum], &[]);
        }
        let pooled = self.node("GlobalAveragePool", &[&x], &[]);
        Ok(self.classifier(&pooled, &m.fc, 1.0))
    }

    fn pplcnet<B: Backend>(&mut self, x: &str, m: &PPLCNet<B>) -> Result<String> {
        let mut x = self.conv_bn(x, &m.conv1)?;
        for stage in [&m.blocks2, &m.blocks3, &m.blocks4, &m.blocks5, &m.blocks6] {
            for b in stage {
                x = self.conv_bn(&x, &b.dw_conv)?;
                if let Some(se) = &b.se {
                    x = self.se(&x, se)?;
                }
                x = self.conv_bn(&x, &b.pw_conv)?;
            }
        }
        let mut x = self.node("GlobalAveragePool", &[&x], &[]);
        let mut scale = 1.0;
        if let Some(conv) = &m.last_conv {
            x = self.conv(&x, conv)?;
            x = self.node("HardSwish", &[&x], &[]);
            scale = 1.0 - m.dropout.prob as f32;
        }
        Ok(self.classifier(&x, &m.fc, scale))
    }

    fn mobilenet_v3<B: Backend>(&mut self, x: &str, m: &MobileNetV3<B>) -> Result<String> {
        let mut x = self.conv_bn(x, &m.conv)?;
        for b in &m.blocks {
            let mut y = self.conv_bn(&x, &b.expand_conv)?;
            y = self.conv_bn(&y, &b.bottleneck_conv)?;
            if let Some(se) = &b.mid_se {
                y = self.se(&y, se)?;
            }
            y = self.conv_bn(&y, &b.linear_conv)?;
            x = if b.shortcut {
                self.node("Add", &[&y, &x], &[])
            } else {
                y
            };
        }
        let x = self.conv_bn(&x, &m.last_second_conv)?;
        let x = self.node("GlobalAveragePool", &[&x], &[]);
        let x = self.conv(&x, &m.last_conv)?;
        let x = self.node("HardSwish", &[&x], &[]);
        Ok(self.classifier(&x, &m.fc, 1.0 - m.dropout.prob as f32))
    }
}

fn value_info(name: &str, dims: &[Option<usize>]) -> Msg {
    let shape = dims.iter().fold(Msg::default(), |m, d| {
        m.msg(
            1,
            match d {
                Some(v) => Msg::default().int(1, *v as i64),
                None => Msg::default().str(2, "N"),
            },
        )
    });
    let tensor = Msg::default().int(1, 1).msg(2, shape);
    Msg::default()
        .str(1, name)
        .msg(2, Msg::default().msg(1, tensor))
}

/// The ONNX model of `backbone` for `[N, C, H, W]` inputs named `image`; `metadata` goes into
/// the model's metadata_props.
pub fn model_bytes<B: Backend>(
    backbone: &Backbone<B>,
    image_shape: [usize; 3],
    class_num: usize,
    metadata: &[(&str, String)],
) -> Result<Vec<u8>> {
    let mut g = Graph {
        nodes: vec![],
        initializers: vec![],
        count: 0,
    };
    let logits = match backbone {
        Backbone::ResNet(m) => g.resnet("image", m)?,
        Backbone::PPLCNet(m) => g.pplcnet("image", m)?,
        Backbone::MobileNetV3(m) => g.mobilenet_v3("image", m)?,
    };
    g.node_to("Identity", &[&logits], &[], "logits".into());
    g.node_to(
        "Softmax",
        &["logits"],
        &[Attr::Int("axis", 1)],
        "scores".into(),
    );
    let [c, h, w] = image_shape;
    let mut graph = Msg::default();
    for n in g.nodes {
        graph = graph.msg(1, n);
    }
    graph = graph.str(2, "kd-launch");
    for t in g.initializers {
        graph = graph.msg(5, t);
    }
    graph = graph
        .msg(11, value_info("image", &[None, Some(c), Some(h), Some(w)]))
        .msg(12, value_info("logits", &[None, Some(class_num)]))
        .msg(12, value_info("scores", &[None, Some(class_num)]));
    let mut model = Msg::default()
        .int(1, IR_VERSION)
        .str(2, "kd-launch")
        .str(3, env!("CARGO_PKG_VERSION"))
        .msg(7, graph)
        .msg(8, Msg::default().str(1, "").int(2, OPSET));
    for (k, v) in metadata {
        model = model.msg(14, Msg::default().str(1, k).str(2, v));
    }
    Ok(model.0)
}
