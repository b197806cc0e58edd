//! The `wasm-pc` binary: see `wasm_pc::main`.

fn main() -> std::process::ExitCode {
    wasm_pc::main()
}
