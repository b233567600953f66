//! Deterministic synthetic inputs for graphs run without user data (`edgevlm run --seed`).

use tract_onnx::prelude::*;

use crate::error::{Error, Result};
use crate::onnx::TensorSpec;

/// SplitMix64: tiny, fast, and identical on every platform, so a seed means the same tensor
/// on the host and on the board.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// A tensor for `spec` filled from `rng`: floats uniform in [-1, 1), integers in 0..10 (valid
/// token ids and indices for most graphs), masks (names containing `mask`) and bools all ones.
/// Symbolic dims become 1.
pub fn random_input(spec: &TensorSpec, rng: &mut SplitMix64) -> Result<Tensor> {
    let shape = spec.concrete_shape();
    let n: usize = shape.iter().product();
    let is_mask = spec.name.to_lowercase().contains("mask");
    let t = match spec.datum_type {
        DatumType::F32 => Tensor::from_shape(
            &shape,
            &(0..n)
                .map(|_| rng.next_f32() * 2.0 - 1.0)
                .collect::<Vec<_>>(),
        ),
        DatumType::F16 => Tensor::from_shape(
            &shape,
            &(0..n)
                .map(|_| f16::from_f32(rng.next_f32() * 2.0 - 1.0))
                .collect::<Vec<_>>(),
        ),
        DatumType::Bool => Tensor::from_shape(&shape, &vec![true; n]),
        dt if dt.is_integer() => {
            let v: Vec<i64> = (0..n)
                .map(|_| {
                    if is_mask {
                        1
                    } else {
                        (rng.next_u64() % 10) as i64
                    }
                })
                .collect();
            Tensor::from_shape(&shape, &v).and_then(|t| t.cast_to_dt(dt).map(|c| c.into_owned()))
        }
        dt => {
            return Err(Error::Input {
                name: spec.name.clone(),
                message: format!("cannot synthesize {dt:?} data: pass it with --input"),
            })
        }
    };
    t.map_err(|e| Error::Input {
        name: spec.name.clone(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::Dim;

    #[test]
    fn same_seed_same_tensor() {
        let spec = TensorSpec {
            name: "x".into(),
            datum_type: DatumType::F32,
            shape: vec![Dim::Symbol("batch".into()), Dim::Fixed(4)],
        };
        let a = random_input(&spec, &mut SplitMix64::new(7)).unwrap();
        let b = random_input(&spec, &mut SplitMix64::new(7)).unwrap();
        let c = random_input(&spec, &mut SplitMix64::new(8)).unwrap();
        assert_eq!(a.shape(), &[1, 4]);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(crate::values::<f32>(&a)
            .unwrap()
            .iter()
            .all(|x| (-1.0..1.0).contains(x)));
        let mask = TensorSpec {
            name: "attention_mask".into(),
            datum_type: DatumType::I64,
            shape: vec![Dim::Fixed(3)],
        };
        assert_eq!(
            random_input(&mask, &mut SplitMix64::new(1)).unwrap(),
            tensor1(&[1i64, 1, 1])
        );
    }
}
