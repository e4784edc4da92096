//! net tests
