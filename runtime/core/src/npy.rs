//! Reading and writing NumPy `.npy` files (format 1.0 to 3.0, little-endian, C order) as tract tensors.
//!
//! The CLI exchanges tensors with Python tooling through `.npy`; fixtures are stored in it.

use std::path::Path;

use tract_onnx::prelude::*;

use crate::error::{Error, Result};

const MAGIC: &[u8] = b"\x93NUMPY";

/// Reads a `.npy` file into a tensor.
pub fn read(path: &Path) -> Result<Tensor> {
    let bytes = std::fs::read(path).map_err(|e| Error::io("reading", path, e))?;
    parse(&bytes).map_err(|message| Error::Npy {
        path: path.to_owned(),
        message,
    })
}

/// Writes a tensor as a `.npy` file (format 1.0).
pub fn write(path: &Path, tensor: &Tensor) -> Result<()> {
    let bytes = encode(tensor).map_err(|message| Error::Npy {
        path: path.to_owned(),
        message,
    })?;
    std::fs::write(path, bytes).map_err(|e| Error::io("writing", path, e))
}

fn descr_of(dt: DatumType) -> Option<&'static str> {
    Some(match dt {
        DatumType::F32 => "<f4",
        DatumType::F64 => "<f8",
        DatumType::F16 => "<f2",
        DatumType::I8 => "|i1",
        DatumType::U8 => "|u1",
        DatumType::I16 => "<i2",
        DatumType::U16 => "<u2",
        DatumType::I32 => "<i4",
        DatumType::U32 => "<u4",
        DatumType::I64 => "<i8",
        DatumType::U64 => "<u8",
        DatumType::Bool => "|b1",
        _ => return None,
    })
}

/// Encodes a tensor into `.npy` bytes.
pub fn encode(tensor: &Tensor) -> std::result::Result<Vec<u8>, String> {
    let dt = tensor.datum_type();
    let descr = descr_of(dt).ok_or_else(|| format!("dtype {dt:?} cannot be stored as .npy"))?;
    let shape = match tensor.shape() {
        [] => "()".to_string(),
        [d] => format!("({d},)"),
        dims => format!(
            "({})",
            dims.iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // Header (magic + version + len + dict + newline) is padded to a multiple of 64 bytes.
    let unpadded = MAGIC.len() + 2 + 2 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + tensor.len() * dt.size_of());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    // Tensors are little-endian in memory on every target we build for (x86_64, aarch64, armv7).
    out.extend_from_slice(tensor.as_bytes());
    Ok(out)
}

/// Parses `.npy` bytes into a tensor.
pub fn parse(bytes: &[u8]) -> std::result::Result<Tensor, String> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err("not a .npy file (bad magic)".into());
    }
    let major = bytes[6];
    let (header_len, start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err("truncated .npy header".into());
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => return Err(format!("unsupported .npy format version {v}")),
    };
    let header = bytes
        .get(start..start + header_len)
        .ok_or("truncated .npy header")?;
    let header = std::str::from_utf8(header).map_err(|_| "header is not UTF-8")?;
    let descr = dict_value(header, "descr").ok_or("header has no 'descr'")?;
    let descr = descr.trim_matches(|c| c == '\'' || c == '"');
    let fortran = dict_value(header, "fortran_order").ok_or("header has no 'fortran_order'")?;
    if fortran.trim() != "False" {
        return Err(
            "Fortran-ordered arrays are not supported: save with np.ascontiguousarray".into(),
        );
    }
    let shape_src = dict_value(header, "shape").ok_or("header has no 'shape'")?;
    let shape = shape_src
        .trim_matches(|c| c == '(' || c == ')')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| format!("bad shape {shape_src}"))
        })
        .collect::<std::result::Result<Vec<usize>, String>>()?;
    let data = &bytes[start + header_len..];
    let count: usize = shape.iter().product();

    macro_rules! typed {
        ($t:ty, $n:expr) => {{
            if data.len() != count * $n {
                return Err(format!(
                    "data has {} bytes, shape {:?} of {} needs {}",
                    data.len(),
                    shape,
                    descr,
                    count * $n
                ));
            }
            let v: Vec<$t> = data
                .chunks_exact($n)
                .map(|c| <$t>::from_le_bytes(c.try_into().unwrap()))
                .collect();
            Tensor::from_shape(&shape, &v).map_err(|e| e.to_string())
        }};
    }
    match descr {
        "<f4" => typed!(f32, 4),
        "<f8" => typed!(f64, 8),
        "<f2" => {
            let t = typed!(u16, 2)?;
            let v: Vec<f16> = crate::values::<u16>(&t)
                .map_err(|e| e.to_string())?
                .into_iter()
                .map(f16::from_bits)
                .collect();
            Tensor::from_shape(&shape, &v).map_err(|e| e.to_string())
        }
        "|i1" | "<i1" => typed!(i8, 1),
        "|u1" | "<u1" => typed!(u8, 1),
        "<i2" => typed!(i16, 2),
        "<u2" => typed!(u16, 2),
        "<i4" => typed!(i32, 4),
        "<u4" => typed!(u32, 4),
        "<i8" => typed!(i64, 8),
        "<u8" => typed!(u64, 8),
        "|b1" => {
            if data.len() != count {
                return Err(format!(
                    "data has {} bytes, shape {shape:?} of bool needs {count}",
                    data.len()
                ));
            }
            let v: Vec<bool> = data.iter().map(|b| *b != 0).collect();
            Tensor::from_shape(&shape, &v).map_err(|e| e.to_string())
        }
        other => Err(format!(
            "unsupported dtype '{other}' (big-endian or structured arrays are not supported)"
        )),
    }
}

/// Extracts the raw text of `key`'s value from a Python dict literal header.
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let at = header
        .find(&format!("'{key}'"))
        .or_else(|| header.find(&format!("\"{key}\"")))?;
    let rest = &header[at + key.len() + 2..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    if rest.starts_with('(') {
        return rest.find(')').map(|end| &rest[..=end]);
    }
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    Some(rest[..end].trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_supported_dtype() {
        let tensors = [
            tensor2(&[[1.5f32, -2.0], [3.25, 0.0]]),
            tensor1(&[1i64, -7, 9]),
            tensor1(&[200u8, 3]),
            tensor1(&[-3i8, 4]),
            tensor1(&[true, false, true]),
            tensor0(42i32),
            tensor1(&[f16::from_f32(0.5), f16::from_f32(-1.0)]),
        ];
        for t in tensors {
            let bytes = encode(&t).unwrap();
            assert_eq!(bytes.len() % 16, (t.len() * t.datum_type().size_of()) % 16);
            assert_eq!(parse(&bytes).unwrap(), t, "{t:?}");
        }
    }

    #[test]
    fn rejects_bad_input_with_a_reason() {
        assert!(parse(b"hello world").unwrap_err().contains("bad magic"));
        let mut bytes = encode(&tensor1(&[1f32, 2., 3.])).unwrap();
        bytes.truncate(bytes.len() - 2);
        let err = parse(&bytes).unwrap_err();
        assert!(err.contains("needs 12"), "{err}");
        let mut fortran = encode(&tensor1(&[1f32])).unwrap();
        let at = fortran.windows(5).position(|w| w == b"False").unwrap();
        fortran[at..at + 5].copy_from_slice(b"True ");
        assert!(parse(&fortran).unwrap_err().contains("Fortran"));
    }
}
