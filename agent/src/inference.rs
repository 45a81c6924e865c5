//! The tract adapter. It accepts only a [`VerifiedBundle`], so tract never parses bytes whose
//! signature and hash were not checked, and a [`Model`] exists only after it reproduced every
//! golden output of its manifest.

use millwright_shared::VerifiedBundle;
use millwright_shared::manifest::Manifest;
use std::collections::HashMap;
use std::sync::Arc;
use tract_onnx::pb::tensor_shape_proto::dimension::Value as Dim;
use tract_onnx::pb::type_proto::Value as TypeValue;
use tract_onnx::prelude::*;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LoadError {
    #[error("model payload is not an ONNX model: {0}")]
    NotOnnx(String),
    #[error("ONNX graph has no input named {expected:?} (inputs: {found:?})")]
    InputMissing { expected: String, found: Vec<String> },
    #[error("ONNX graph has no output named {expected:?} (outputs: {found:?})")]
    OutputMissing { expected: String, found: Vec<String> },
    #[error(
        "ONNX input {name:?} has shape {declared} but the manifest says [batch, {window}, {features}]"
    )]
    ShapeMismatch { name: String, declared: String, window: usize, features: usize },
    #[error("tract cannot run this model: {0}")]
    Unsupported(String),
    #[error(
        "golden case {case}: output {got:?} differs from the expected {expected:?} by more than {tolerance}"
    )]
    GoldenMismatch { case: usize, got: Vec<f32>, expected: Vec<f32>, tolerance: f32 },
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("inference failed: {0}")]
pub struct InferenceError(String);

type Plan = Arc<TypedRunnableModel>;

/// A loaded, self-tested model with one optimised plan per batch size used so far.
pub struct Model {
    manifest: Manifest,
    graph: InferenceModel,
    plans: HashMap<usize, (Plan, TypedSimpleState)>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("model", &self.manifest.model)
            .field("release", &self.manifest.release)
            .finish()
    }
}

fn dims_of(value: &tract_onnx::pb::ValueInfoProto) -> Option<Vec<Option<i64>>> {
    let Some(TypeValue::TensorType(t)) = value.r#type.as_ref()?.value.as_ref() else {
        return None;
    };
    Some(
        t.shape
            .as_ref()?
            .dim
            .iter()
            .map(|d| match d.value {
                Some(Dim::DimValue(v)) => Some(v),
                _ => None,
            })
            .collect(),
    )
}

fn show(dims: &[Option<i64>]) -> String {
    let parts: Vec<String> =
        dims.iter().map(|d| d.map_or("?".to_owned(), |v| v.to_string())).collect();
    format!("[{}]", parts.join(", "))
}

impl Model {
    pub fn load(bundle: &VerifiedBundle) -> Result<Model, LoadError> {
        let manifest = bundle.manifest().clone();
        let onnx = tract_onnx::onnx().with_ignore_value_info(true);
        let mut bytes = bundle.model_bytes();
        let proto =
            onnx.proto_model_for_read(&mut bytes).map_err(|e| LoadError::NotOnnx(e.to_string()))?;
        let graph = proto
            .graph
            .as_ref()
            .filter(|g| !g.node.is_empty())
            .ok_or_else(|| LoadError::NotOnnx("it holds no graph".into()))?;
        check_signature(&manifest, graph)?;

        let graph = onnx
            .model_for_proto_model(&proto)
            .map_err(|e| LoadError::Unsupported(format!("{e:#}")))?;
        let mut model = Model { manifest, graph, plans: HashMap::new() };
        model.plan(1).map_err(|e| LoadError::Unsupported(e.0))?;
        model.self_test()?;
        Ok(model)
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn self_test(&mut self) -> Result<(), LoadError> {
        let golden = self.manifest.golden.clone();
        for (case, g) in golden.cases.iter().enumerate() {
            let got = self.predict(&g.input).map_err(|e| LoadError::Unsupported(e.0))?;
            let close = got.len() == g.output.len()
                && got.iter().zip(&g.output).all(|(a, b)| (a - b).abs() <= golden.tolerance);
            if !close {
                return Err(LoadError::GoldenMismatch {
                    case,
                    got,
                    expected: g.output.clone(),
                    tolerance: golden.tolerance,
                });
            }
        }
        Ok(())
    }

    fn plan(&mut self, batch: usize) -> Result<&mut TypedSimpleState, InferenceError> {
        if !self.plans.contains_key(&batch) {
            let (window, width) = (self.manifest.input.window, self.manifest.input.features.len());
            let err = |e: TractError| InferenceError(format!("{e:#}"));
            let plan = self
                .graph
                .clone()
                .with_input_fact(0, f32::fact([batch, window, width]).into())
                .and_then(|m| m.into_optimized())
                .and_then(|m| m.into_runnable())
                .map_err(err)?;
            let state = plan.spawn().map_err(err)?;
            self.plans.insert(batch, (plan, state));
        }
        match self.plans.get_mut(&batch) {
            Some((_, state)) => Ok(state),
            None => Err(InferenceError("plan cache".into())),
        }
    }

    /// Runs one window (`window × features` values, row-major); returns the output row.
    pub fn predict(&mut self, window: &[f32]) -> Result<Vec<f32>, InferenceError> {
        Ok(self.predict_batch(window, 1)?.pop().unwrap_or_default())
    }

    /// Runs `batch` windows laid end to end; returns one output row per window.
    pub fn predict_batch(
        &mut self,
        windows: &[f32],
        batch: usize,
    ) -> Result<Vec<Vec<f32>>, InferenceError> {
        let (window, width) = (self.manifest.input.window, self.manifest.input.features.len());
        if batch == 0 || windows.len() != batch * window * width {
            return Err(InferenceError(format!(
                "expected {batch} × {window} × {width} values, got {}",
                windows.len()
            )));
        }
        let err = |e: TractError| InferenceError(format!("{e:#}"));
        let input = Tensor::from_shape(&[batch, window, width], windows).map_err(err)?;
        let state = self.plan(batch)?;
        let outputs = state.run(tvec!(input.into_tvalue())).map_err(err)?;
        let out = outputs.first().ok_or_else(|| InferenceError("no output".into()))?;
        let values: Vec<f32> =
            out.to_plain_array_view::<f32>().map_err(err)?.iter().copied().collect();
        let per = values.len() / batch;
        Ok(values.chunks(per.max(1)).map(<[f32]>::to_vec).collect())
    }
}

/// The graph's declared input and output must be the ones the manifest describes.
fn check_signature(
    manifest: &Manifest,
    graph: &tract_onnx::pb::GraphProto,
) -> Result<(), LoadError> {
    let initializers: Vec<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs: Vec<_> =
        graph.input.iter().filter(|i| !initializers.contains(&i.name.as_str())).collect();
    let expected = &manifest.input.tensor;
    let input = match inputs.as_slice() {
        [only] if &only.name == expected => *only,
        _ => {
            return Err(LoadError::InputMissing {
                expected: expected.clone(),
                found: inputs.iter().map(|i| i.name.clone()).collect(),
            });
        }
    };
    let (window, features) = (manifest.input.window, manifest.input.features.len());
    if let Some(dims) = dims_of(input) {
        let fits = dims.len() == 3
            && dims[1].is_none_or(|d| d == window as i64)
            && dims[2].is_none_or(|d| d == features as i64);
        if !fits {
            return Err(LoadError::ShapeMismatch {
                name: input.name.clone(),
                declared: show(&dims),
                window,
                features,
            });
        }
    }
    let outputs: Vec<String> = graph.output.iter().map(|o| o.name.clone()).collect();
    if !outputs.contains(&manifest.output.tensor) {
        return Err(LoadError::OutputMissing {
            expected: manifest.output.tensor.clone(),
            found: outputs,
        });
    }
    Ok(())
}
