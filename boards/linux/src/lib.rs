//! edgevlm Linux board layer (work in progress).
