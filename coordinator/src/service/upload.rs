//! `ArtifactUpload`: one upload in progress. When the connection drops,
//! the RPC system drops this capability, and with it the upload: its slot
//! and its temporary file go (`crate::artifacts::Upload`).

use std::cell::RefCell;
use std::time::Instant;

use capnp::capability::Rc;
use schema::miren_capnp::artifact_upload;

use super::wire::{err, joined, upload_err};
use crate::artifacts::{ArtifactError, Upload};

/// An artifact upload in progress.
pub struct UploadService {
    /// `None` once `finish` took it.
    upload: RefCell<Option<Upload>>,
    /// Where `finish` syncs the file (not this RPC worker's thread).
    rt: tokio::runtime::Handle,
}

impl UploadService {
    pub fn new(upload: Upload, rt: tokio::runtime::Handle) -> UploadService {
        UploadService {
            upload: RefCell::new(Some(upload)),
            rt,
        }
    }
}

fn upload_closed() -> capnp::Error {
    err(ArtifactError::Closed)
}

impl artifact_upload::Server for UploadService {
    async fn write(
        self: Rc<Self>,
        params: artifact_upload::WriteParams,
        _: artifact_upload::WriteResults,
    ) -> Result<(), capnp::Error> {
        let data = params.get()?.get_data()?;
        let mut upload = self.upload.borrow_mut();
        let upload = upload.as_mut().ok_or_else(upload_closed)?;
        upload.write(data, Instant::now()).map_err(upload_err)
    }

    async fn finish(
        self: Rc<Self>,
        params: artifact_upload::FinishParams,
        mut results: artifact_upload::FinishResults,
    ) -> Result<(), capnp::Error> {
        let sha = params.get()?.get_sha256()?.to_str()?.to_string();
        let mut upload = self.upload.borrow_mut().take().ok_or_else(upload_closed)?;
        let finished = self.rt.spawn_blocking(move || upload.finish(&sha));
        let size = joined(finished).await?.map_err(upload_err)?;
        results.get().set_size(size);
        Ok(())
    }
}
