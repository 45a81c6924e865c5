//! Model fixtures for rollout tests: ONNX models derived from the committed reference model by
//! editing its protobuf (nodes appended after its output, or a changed input declaration), and
//! validly signed bundles for them whose golden cases come from the agent's own loader.
//!
//! The variants run in tract like any release would, so a rollout gate has to catch them by
//! what they compute (an offset, NaN on live data, latency), not by a refusal at load time;
//! only [`wrong_input_shape`] and [`not_onnx`] are refused by the loader.

use crate::{BUNDLE, TEST_DATA, repo_file};
use anyhow::{Context as _, Result, ensure};
use ed25519_dalek::SigningKey;
use millwright_agent::cmapss;
use millwright_agent::inference::{LoadError, Model};
use millwright_agent::window::Window;
use millwright_shared::Release;
use millwright_shared::bundle::{self, RawBundle};
use millwright_shared::keys::{KeyId, TrustedKeys};
use millwright_shared::manifest::{GoldenCase, Manifest};
use prost::Message as _;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::tensor_shape_proto::dimension::Value as Dim;
use tract_onnx::pb::type_proto::Value as TypeValue;
use tract_onnx::pb::{ModelProto, NodeProto, TensorProto};

pub const REFERENCE_ONNX: &str = "models/rul-cnn-fd001/model.onnx";

/// Width of the hidden layers of [`slow`]'s extra work.
const SLOW_WIDTH: usize = 128;
/// How many `SLOW_WIDTH`-wide MatMul + Relu links cost as much as one reference inference:
/// measured with `Model::predict` (batch 1) in the test profile on the 2-core development
/// machine, where the reference takes about 100 µs and a link about 27 µs.
const SLOW_LINKS_PER_BASE: f32 = 3.7;
/// What [`slow`]'s extra work is multiplied by before it is added to the output: its sum stays
/// far below one ulp of a remaining useful life.
const SLOW_SCALE: f32 = 1e-12;

/// The committed reference model.
pub fn reference_onnx() -> Vec<u8> {
    std::fs::read(repo_file(REFERENCE_ONNX)).expect("the reference model is committed")
}

/// The reference bundle's manifest (release 1).
pub fn reference_manifest() -> Result<Manifest> {
    let bytes = std::fs::read(repo_file(BUNDLE)).context("reading the reference bundle")?;
    Ok(RawBundle::parse(&bytes)?.manifest_unverified()?)
}

/// A plausible retrained release: the reference output plus `offset` cycles.
pub fn healthy(offset: f32) -> Vec<u8> {
    shifted(offset)
}

/// A release that runs fine but disagrees with the current one by `offset` cycles (e.g. 40).
pub fn disagreeing(offset: f32) -> Vec<u8> {
    shifted(offset)
}

fn shifted(offset: f32) -> Vec<u8> {
    let mut tail = Tail::new();
    let offset = tail.constant(&[1], &[offset]);
    let original = tail.original.clone();
    let y = tail.node("Add", &[&original, &offset]);
    tail.finish(&y)
}

/// The reference output where it is at most `threshold` cycles, NaN above: finite on worn
/// engines, NaN on the fresh ones that most live data comes from.
pub fn nan_on_live_data(threshold: f32) -> Vec<u8> {
    let mut tail = Tail::new();
    let threshold = tail.constant(&[1], &[threshold]);
    let nan = tail.constant(&[1], &[f32::NAN]);
    let original = tail.original.clone();
    let above = tail.node("Greater", &[&original, &threshold]);
    let y = tail.node("Where", &[&above, &nan, &original]);
    tail.finish(&y)
}

/// The reference outputs (within 1e-4) at about `factor` times the inference time: a chain of
/// MatMul + Relu links on the input window whose sum, scaled by [`SLOW_SCALE`], is added to the
/// output. It depends on the input, so tract's optimiser cannot fold it into a constant.
pub fn slow(factor: f32) -> Vec<u8> {
    let links = slow_links(factor);
    let mut tail = Tail::new();
    let features = tail.input_dims().last().copied().unwrap_or(0);
    let window = tail.input_dims().get(1).copied().unwrap_or(0);
    let input = tail.input.clone();
    let w_in = tail.constant(&[features, SLOW_WIDTH], &weights(features * SLOW_WIDTH, features));
    let w = tail.constant(&[SLOW_WIDTH, SLOW_WIDTH], &weights(SLOW_WIDTH * SLOW_WIDTH, SLOW_WIDTH));
    let w_out = tail.constant(&[SLOW_WIDTH, 1], &weights(SLOW_WIDTH, SLOW_WIDTH));
    let scale = tail.constant(&[window, 1], &vec![SLOW_SCALE; window]);
    let mut h = tail.node("MatMul", &[&input, &w_in]);
    for _ in 0..links {
        let product = tail.node("MatMul", &[&h, &w]);
        h = tail.node("Relu", &[&product]);
    }
    let per_row = tail.node("MatMul", &[&h, &w_out]);
    let rows = tail.node("Flatten", &[&per_row]);
    let extra = tail.node("MatMul", &[&rows, &scale]);
    let original = tail.original.clone();
    let y = tail.node("Add", &[&original, &extra]);
    tail.finish(&y)
}

/// How many MatMul + Relu links [`slow`] adds for `factor` (at least one).
pub fn slow_links(factor: f32) -> usize {
    ((factor - 1.0) * SLOW_LINKS_PER_BASE).round().max(1.0) as usize
}

/// Deterministic pseudo-random weights in ±sqrt(6 / fan_in) (He-uniform), so the Relu chain
/// neither explodes nor dies out.
fn weights(n: usize, fan_in: usize) -> Vec<f32> {
    let bound = (6.0 / fan_in.max(1) as f32).sqrt();
    let mut state: u32 = 0x9e37_79b9;
    (0..n)
        .map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (f32::from(((state >> 8) & 0xffff) as u16) / 65535.0 * 2.0 - 1.0) * bound
        })
        .collect()
}

/// The reference model with its input declared as `[batch, window, features - 1]`.
pub fn wrong_input_shape() -> Vec<u8> {
    let mut model = decode_reference();
    let graph = model.graph.as_mut().expect("the reference model has a graph");
    let input = graph.input.first_mut().expect("the reference graph has an input");
    if let Some(TypeValue::TensorType(t)) = input.r#type.as_mut().and_then(|t| t.value.as_mut())
        && let Some(Dim::DimValue(features)) =
            t.shape.as_mut().and_then(|s| s.dim.get_mut(2)).and_then(|d| d.value.as_mut())
    {
        *features -= 1;
    }
    model.encode_to_vec()
}

/// A payload that is not an ONNX model at all.
pub fn not_onnx() -> Vec<u8> {
    b"this is a text file, not an ONNX model\n".to_vec()
}

fn decode_reference() -> ModelProto {
    ModelProto::decode(reference_onnx().as_slice()).expect("the reference model is valid ONNX")
}

/// The reference graph being extended: its output is renamed to `original`, appended nodes
/// read it, and [`Tail::finish`] gives the last node the graph output's name.
struct Tail {
    model: ModelProto,
    input: String,
    original: String,
    output: String,
    names: usize,
}

impl Tail {
    fn new() -> Tail {
        let mut model = decode_reference();
        let graph = model.graph.as_mut().expect("the reference model has a graph");
        let input = graph.input.first().expect("the reference graph has an input").name.clone();
        let output = graph.output.first().expect("the reference graph has an output").name.clone();
        let original = format!("{output}/original");
        for name in graph.node.iter_mut().flat_map(|n| n.input.iter_mut().chain(&mut n.output)) {
            if *name == output {
                name.clone_from(&original);
            }
        }
        Tail { model, input, original, output, names: 0 }
    }

    fn graph(&mut self) -> &mut tract_onnx::pb::GraphProto {
        self.model.graph.as_mut().expect("the reference model has a graph")
    }

    fn fresh_name(&mut self, kind: &str) -> String {
        self.names += 1;
        format!("variant/{kind}_{}", self.names)
    }

    /// The declared input dimensions (0 for a symbolic one such as the batch).
    fn input_dims(&self) -> Vec<usize> {
        let input = self.model.graph.as_ref().and_then(|g| g.input.first());
        let Some(TypeValue::TensorType(t)) =
            input.and_then(|i| i.r#type.as_ref()).and_then(|t| t.value.as_ref())
        else {
            return Vec::new();
        };
        let dims = t.shape.as_ref().map(|s| s.dim.as_slice()).unwrap_or_default();
        dims.iter()
            .map(|d| match d.value {
                Some(Dim::DimValue(v)) => usize::try_from(v).unwrap_or(0),
                _ => 0,
            })
            .collect()
    }

    /// Adds a float32 initializer; returns its name.
    fn constant(&mut self, dims: &[usize], values: &[f32]) -> String {
        let name = self.fresh_name("const");
        let tensor = TensorProto {
            name: name.clone(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: DataType::Float as i32,
            float_data: values.to_vec(),
            ..TensorProto::default()
        };
        self.graph().initializer.push(tensor);
        name
    }

    /// Appends a node without attributes; returns the name of its single output.
    fn node(&mut self, op: &str, inputs: &[&str]) -> String {
        let output = self.fresh_name(op);
        let node = NodeProto {
            name: output.clone(),
            op_type: op.to_owned(),
            input: inputs.iter().map(|&i| i.to_owned()).collect(),
            output: vec![output.clone()],
            ..NodeProto::default()
        };
        self.graph().node.push(node);
        output
    }

    /// Names `result` as the graph output and encodes the model.
    fn finish(mut self, result: &str) -> Vec<u8> {
        let output = self.output.clone();
        for name in self.graph().node.iter_mut().flat_map(|n| &mut n.output) {
            if name == result {
                name.clone_from(&output);
            }
        }
        self.model.encode_to_vec()
    }
}

/// A bundle of `onnx` from the reference manifest with `release`, a fixture version label and
/// golden outputs computed by the agent's loader from `onnx` itself, changed by `edit` and
/// signed by every key in `keys`. Golden cases on which the variant's output is not finite are
/// dropped (an error if none is left); a model the loader refuses before its self-test (not
/// ONNX, wrong input) keeps the reference golden cases.
pub fn signed_bundle(
    onnx: &[u8],
    release: u64,
    keys: &[&SigningKey],
    edit: impl FnOnce(&mut Manifest),
) -> Result<Vec<u8>> {
    let mut manifest = reference_manifest()?;
    manifest.release = Release(release);
    manifest.version = format!("{release}.0.0-fixture");
    manifest.golden.cases = golden_cases(onnx, &manifest)?;
    edit(&mut manifest);
    Ok(sign(manifest, onnx, keys))
}

/// Trusts exactly `keys`, all of them required.
pub fn trusted_keys(keys: &[&SigningKey]) -> TrustedKeys {
    let ids = keys.iter().map(|k| (KeyId::of(&k.verifying_key()), k.verifying_key()));
    TrustedKeys::new(ids.collect(), keys.len())
}

fn sign(manifest: Manifest, onnx: &[u8], keys: &[&SigningKey]) -> Vec<u8> {
    let mut raw = RawBundle::unsigned(manifest, onnx.to_vec());
    for key in keys {
        raw.sign(key);
    }
    raw.to_bytes()
}

/// `manifest`'s golden inputs with `onnx`'s finite outputs, found by loading `onnx` with a
/// tolerance that accepts any finite output and dropping each case the self-test fails on.
fn golden_cases(onnx: &[u8], manifest: &Manifest) -> Result<Vec<GoldenCase>> {
    let mut probe = manifest.clone();
    probe.golden.tolerance = f32::MAX;
    loop {
        ensure!(!probe.golden.cases.is_empty(), "the model's output is NaN on every golden input");
        match load_unchecked(onnx, &probe)? {
            Ok(mut model) => {
                let cases = probe.golden.cases.iter().map(|case| {
                    let output = model.predict(&case.input)?;
                    Ok(GoldenCase { input: case.input.clone(), output })
                });
                return cases.collect();
            }
            Err(LoadError::GoldenMismatch { case, .. }) => {
                probe.golden.cases.remove(case);
            }
            Err(_) => return Ok(manifest.golden.cases.clone()),
        }
    }
}

/// `Model::load` on a bundle signed by a throwaway key.
fn load_unchecked(onnx: &[u8], manifest: &Manifest) -> Result<Result<Model, LoadError>> {
    let key = SigningKey::from_bytes(&[0x5a; 32]);
    let bytes = sign(manifest.clone(), onnx, &[&key]);
    let verified = bundle::verify(&bytes, &trusted_keys(&[&key]), manifest.created_at)?;
    Ok(Model::load(&verified))
}

/// Every full window of the committed test data, built as the agent builds them (per unit, in
/// cycle order, the manifest's features).
pub fn test_windows() -> Result<Vec<Vec<f32>>> {
    let manifest = reference_manifest()?;
    let text = std::fs::read_to_string(repo_file(TEST_DATA)).context("reading the test data")?;
    let rows = cmapss::parse(&text)?;
    let columns = cmapss::feature_indices(manifest.feature_names())?;
    let mut windows = Vec::new();
    for unit in cmapss::units(&rows) {
        let mut window = Window::new(manifest.input.window, columns.len());
        for row in rows.iter().filter(|r| r.unit == unit) {
            windows.extend(window.push(columns.iter().map(|&c| row.values[c] as f32).collect()));
        }
    }
    Ok(windows)
}
