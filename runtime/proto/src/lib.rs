//! edgevlm wire protocol (work in progress).
#![no_std]
