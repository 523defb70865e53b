//! `tarn profile push|show IMAGE`: the start profile the daemon keeps for
//! an image (learned on its first start here, `[profile]`), pushed to the
//! image's repository as an OCI artifact that refers to its manifest, or
//! printed.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use tarn_fs::layer::profile::{MEDIA_TYPE, Profile};
use tarn_fs::registry::{Descriptor, Reference, ResolvedImage};
use tarn_proto::admin::GetProfileRequest;

use crate::status::connect;

/// Start profiles: what an image's workload read in its first seconds.
#[derive(clap::Args, Debug)]
pub struct ProfileArgs {
    #[command(subcommand)]
    command: ProfileCommand,
}

#[derive(clap::Subcommand, Debug)]
enum ProfileCommand {
    Push(ImageArgs),
    Show(ImageArgs),
}

/// Push: attach the image's start profile to it in the registry (the
/// referrers API where the registry has it, else the `sha256-<hex>` tag),
/// so nodes with `[profile]` on find it when they pull the image.
/// Show: print the profile this node keeps for the image.
#[derive(clap::Args, Debug)]
struct ImageArgs {
    /// The image, as pulled (its manifest digest keys the profile)
    image: String,
    /// Reach the registry over plain HTTP
    #[arg(long)]
    plain_http: bool,
    /// The daemon's admin socket
    #[arg(long, default_value = "/run/tarn/admin.sock")]
    admin_address: PathBuf,
}

pub async fn run(args: ProfileArgs) -> Result<()> {
    match args.command {
        ProfileCommand::Push(a) => push(a).await,
        ProfileCommand::Show(a) => show(a).await,
    }
}

/// The image's manifest, and the profile the daemon keeps for it.
async fn profile_of(args: &ImageArgs) -> Result<(Reference, ResolvedImage, Vec<u8>, Profile)> {
    let reference: Reference = args
        .image
        .parse()
        .with_context(|| format!("bad image reference {:?}", args.image))?;
    let plain = args
        .plain_http
        .then(|| reference.repository.registry.clone());
    let registry = crate::pull::registry_client(plain.into_iter().collect()).await?;
    let image = registry
        .resolve(&reference)
        .await
        .with_context(|| format!("cannot resolve {reference}"))?;
    let mut admin = connect(&args.admin_address).await?;
    let document = match admin
        .get_profile(GetProfileRequest {
            manifest_digest: image.manifest_digest.to_string(),
        })
        .await
    {
        Ok(r) => r.into_inner().document,
        Err(s) if s.code() == tonic::Code::NotFound => bail!(
            "no start profile for {reference} (manifest {}) on this node: start the image once with [profile] enabled, and let the recording end",
            image.manifest_digest
        ),
        Err(s) => bail!("{}", s.message()),
    };
    let profile = Profile::parse(&document).context("the daemon's profile does not read")?;
    Ok((reference, image, document, profile))
}

async fn push(args: ImageArgs) -> Result<()> {
    let (reference, image, document, profile) = profile_of(&args).await?;
    let plain = args
        .plain_http
        .then(|| reference.repository.registry.clone());
    let registry = crate::pull::registry_client(plain.into_iter().collect()).await?;
    let subject = Descriptor {
        media_type: image.manifest_media_type.clone(),
        digest: image.manifest_digest,
        size: image.manifest_bytes.len() as u64,
        annotations: Default::default(),
    };
    let pushed = registry
        .push_referrer(
            &reference.repository,
            &subject,
            MEDIA_TYPE,
            Bytes::from(document),
        )
        .await
        .with_context(|| format!("cannot push the start profile of {reference}"))?;
    println!(
        "pushed the start profile of {reference} ({} files in {} layers) as {pushed}, referring to {}",
        profile.files(),
        profile.layers.len(),
        image.manifest_digest
    );
    Ok(())
}

async fn show(args: ImageArgs) -> Result<()> {
    let (_, _, _, profile) = profile_of(&args).await?;
    println!("{}", serde_json::to_string_pretty(&profile)?);
    Ok(())
}
