//! `millwright broker mosquitto-config`: a Mosquitto listener and ACL file from the server's
//! device registry (see [`millwright_server::mosquitto`]). The server keeps the ACL current itself when
//! `[identity] mosquitto_acl` names the same file.

use super::Failure;
use super::api::ApiArgs;
use super::bundle::write;
use millwright_server::identity_db::EnrolledRow;
use std::path::PathBuf;

#[derive(Debug, clap::Subcommand)]
pub enum BrokerCommand {
    /// Write OUT_DIR/millwright.conf (a TLS listener requiring fleet client certificates) and
    /// OUT_DIR/millwright.acl (each enrolled device confined to its own topics).
    MosquittoConfig {
        /// The fleet CA certificate.
        #[arg(long)]
        ca_file: PathBuf,
        /// The broker's certificate and key (`millwright ca server-cert --name broker ...`).
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
        #[arg(long, default_value_t = 8883)]
        port: u16,
        #[arg(long, default_value = "0.0.0.0")]
        bind: String,
        /// Topic filters every device may also read (repeatable), e.g. a sensor topic (the
        /// server's `[identity] mosquitto_device_reads` must name the same).
        #[arg(long = "device-read")]
        device_reads: Vec<String>,
        #[arg(long, default_value = ".")]
        out_dir: PathBuf,
        #[command(flatten)]
        api: ApiArgs,
    },
}

pub fn run(command: BrokerCommand) -> Result<(), Failure> {
    let BrokerCommand::MosquittoConfig {
        ca_file,
        cert,
        key,
        port,
        bind,
        device_reads,
        out_dir,
        api,
    } = command;
    let rows = api.trusting(&ca_file).get("/api/v1/enrollments")?;
    let rows: Vec<EnrolledRow> = serde_json::from_value(rows)?;
    std::fs::create_dir_all(&out_dir)?;
    let acl_path = std::path::absolute(out_dir.join("millwright.acl"))?;
    let absolute = |p: &PathBuf| std::path::absolute(p);
    let listener = millwright_server::mosquitto::Listener {
        bind: &bind,
        port,
        ca: &absolute(&ca_file)?,
        cert: &absolute(&cert)?,
        key: &absolute(&key)?,
        acl: &acl_path,
    };
    write(&acl_path, millwright_server::mosquitto::acl(&rows, &device_reads).as_bytes(), false)?;
    let conf = out_dir.join("millwright.conf");
    write(&conf, millwright_server::mosquitto::config(&listener).as_bytes(), false)?;
    let enrolled = rows.iter().filter(|r| r.revoked_ms.is_none()).count();
    println!(
        "{} and {} ({enrolled} enrolled devices); run mosquitto -c {}",
        conf.display(),
        acl_path.display(),
        conf.display()
    );
    println!(
        "keep the ACL current: in the server's [identity] set mosquitto_acl = {:?}, \
         mosquitto_reload (e.g. \"systemctl reload mosquitto\"){}",
        acl_path.display().to_string(),
        if device_reads.is_empty() {
            String::new()
        } else {
            format!(" and mosquitto_device_reads = {device_reads:?}")
        }
    );
    Ok(())
}
