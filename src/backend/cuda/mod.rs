//! CUDA runtime (cudarc, dynamic loading), embedded fatbin, kernel launchers.
