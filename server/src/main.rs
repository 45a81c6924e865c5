//! `millwright-server`: see [`millwright_server::daemon`].

fn main() -> std::process::ExitCode {
    millwright_server::daemon::main()
}
