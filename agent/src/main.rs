//! `millwright-agent`: see [`millwright_agent::cli`].

fn main() -> std::process::ExitCode {
    millwright_agent::cli::main()
}
