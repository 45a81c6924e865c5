//! The e2e build of the cli binary: the same entry point, built with the test binary.

fn main() -> std::process::ExitCode {
    millwright_cli::main()
}
