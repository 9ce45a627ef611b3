//! `eastwest-bench serve`.

#[derive(Debug, clap::Args)]
pub struct Args {}

pub async fn main(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("eastwest-bench serve: not implemented yet")
}
