//! edgevlm board agent (work in progress).
