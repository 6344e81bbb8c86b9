//! NF4 quantization in the bitsandbytes format.
