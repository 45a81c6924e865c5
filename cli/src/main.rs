//! `millwright`: the central team's command line (keys, bundles, scoring, the demo).

fn main() -> std::process::ExitCode {
    millwright_cli::main()
}
