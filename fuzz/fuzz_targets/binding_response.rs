#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| wasm_pc::fuzz::binding_response(data));
