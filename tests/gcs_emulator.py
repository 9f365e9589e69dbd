"""gcp-storage-emulator with the object generations that tensorstore (Orbax's array writer) relies on.

Real GCS sends `x-goog-generation` with every media download and honours the `ifGenerationMatch` /
`ifGenerationNotMatch` preconditions; tensorstore's OCDBT driver reads its manifest conditionally and creates it
with ifGenerationMatch=0, and the workdir lock (collapse_jax/lock.py through paths.replace_if / remove_if)
creates, replaces and deletes its object only at the generation it read. The emulator does neither, so a
checkpoint save fails now and then with "Malformed StorageGeneration" and two lock takers could both win. This
wrapper adds both, to downloads, uploads (media and multipart) and deletes (the emulator serves one request at a
time, so check-then-write is atomic) and then runs the emulator's own CLI:
  python tests/gcs_emulator.py start --host=127.0.0.1 --port=PORT --in-memory --default-bucket=NAME
"""
import sys
from http import HTTPStatus

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects  # patched before the server module builds its routes

_download, _insert, _delete = objects.download, objects.insert, objects.delete


def _generation(request, storage) -> str:
  try:
    return str(storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])["generation"])
  except NotFound:
    return "0"


def _arg(request, name):
  v = request.query.get(name)
  return v[0] if v else None


def download(request, response, storage, *args, **kwargs):
  gen = _generation(request, storage)
  if gen != "0":
    match, not_match = _arg(request, "ifGenerationMatch"), _arg(request, "ifGenerationNotMatch")
    if match is not None and match != gen:
      response.status = HTTPStatus.PRECONDITION_FAILED
      return
    response["x-goog-generation"] = gen
    response["x-goog-metageneration"] = "1"
    if not_match is not None and not_match == gen:
      response.status = HTTPStatus.NOT_MODIFIED
      return
  return _download(request, response, storage, *args, **kwargs)


def insert(request, response, storage, *args, **kwargs):
  match, name = _arg(request, "ifGenerationMatch"), _arg(request, "name")
  if name is None and _arg(request, "uploadType") == "multipart" and isinstance(request.data, dict):
    name = request.data.get("meta", {}).get("name")  # gcsfs's pipe_file(mode="create") names it in the body
  if match is not None and name is not None:
    request.params["object_id"] = name
    gen = _generation(request, storage)
    del request.params["object_id"]
    if match != gen:
      response.status = HTTPStatus.PRECONDITION_FAILED
      return
  return _insert(request, response, storage, *args, **kwargs)


def delete(request, response, storage, *args, **kwargs):
  match = _arg(request, "ifGenerationMatch")
  gen = _generation(request, storage) if match is not None else None
  if match is not None and match != gen:
    response.status = HTTPStatus.NOT_FOUND if gen == "0" else HTTPStatus.PRECONDITION_FAILED
    return
  return _delete(request, response, storage, *args, **kwargs)


objects.download, objects.insert, objects.delete = download, insert, delete

if __name__ == "__main__":
  from gcp_storage_emulator.__main__ import main
  sys.exit(main(sys.argv[1:]))
