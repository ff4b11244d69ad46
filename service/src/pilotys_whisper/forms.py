"""What a request may hold in memory besides its audio: multipart forms parsed with one budget for all the fields
that are not files, and the bounds of the bodies that carry fields only (JSON, url-encoded forms)."""

from __future__ import annotations

from werkzeug.datastructures import FileStorage
from werkzeug.formparser import FormDataParser, MultiPartParser
from werkzeug.sansio.multipart import Data, Epilogue, Field, File, MultipartDecoder, NeedData

from .errors import ApiError

# Parts of a multipart form: the file and every field a client of the OpenAI API sends (about ten) fit.
MAX_FORM_PARTS = 32
# All the fields that are not files, together. The largest is a prompt of 4000 characters: 16 KB at most in
# UTF-8. Werkzeug bounds each field alone (1 MB here before, with 1000 parts: 200 fields of 500 KB were all
# held in memory, +100 MB for one request).
MAX_FORM_FIELDS_BYTES = 64 * 1024
# A body that is not a multipart form holds fields only (an upload grant's JSON, a url-encoded form): a prompt
# of 4000 characters is 24 KB even when every character is sent as a \\uXXXX escape.
MAX_FIELDS_BODY_BYTES = 32 * 1024
# The multipart decoder's own buffer: one read of the body (64 KB) and what is left of the previous one. A part's
# headers must fit in it; the fields' data is bounded by MAX_FORM_FIELDS_BYTES.
DECODER_BUFFER_BYTES = 2 * 64 * 1024
# Fields that carry audio as text (OpenAI sends speaker reference clips as data URLs, hundreds of KB each): they
# go to temporary files like file parts, outside MAX_FORM_FIELDS_BYTES, and come out in request.files.
FIELDS_AS_FILES = frozenset({"known_speaker_references[]", "known_speaker_references"})


def form_too_large() -> ApiError:
    return ApiError(413, "form_too_large",
                    f"the form exceeds this server's limits: at most {MAX_FORM_PARTS} parts, and "
                    f"{MAX_FORM_FIELDS_BYTES // 1024} KB in all for the fields that are not files; send the audio "
                    "as a file part named 'file', with a filename (as curl -F file=@audio.wav does)")


def fields_body_too_large() -> ApiError:
    return ApiError(413, "body_too_large", f"a request body that is not a multipart form (JSON, a url-encoded "
                    f"form) is at most {MAX_FIELDS_BODY_BYTES // 1024} KB")


class BoundedFormParser(FormDataParser):
    """Werkzeug's form parser, with BoundedMultiPartParser for multipart forms (url-encoded ones are bounded
    by the request's max_content_length, MAX_FIELDS_BODY_BYTES)."""

    def _parse_multipart(self, stream, mimetype, content_length, options):
        boundary = options.get("boundary", "").encode("ascii")
        if not boundary:
            raise ValueError("Missing boundary")
        parser = BoundedMultiPartParser(stream_factory=self.stream_factory, cls=self.cls,
                                        max_form_memory_size=self.max_form_memory_size,
                                        max_form_parts=self.max_form_parts)
        form, files = parser.parse(stream, boundary, content_length)
        return stream, form, files


class BoundedMultiPartParser(MultiPartParser):
    """Files go to the stream factory as they arrive; the fields that are not files are held in memory, and
    refused (413 form_too_large) as soon as they pass MAX_FORM_FIELDS_BYTES together."""

    def parse(self, stream, boundary, content_length):
        decoder = MultipartDecoder(boundary, max_form_memory_size=self.max_form_memory_size,
                                   max_parts=self.max_form_parts)
        fields, files = [], []
        held = 0  # bytes of the fields that are not files, so far
        part: Field | File | None = None
        sink = None
        while True:
            chunk = stream.read(self.buffer_size)
            decoder.receive_data(chunk or None)  # None: the end of the body
            event = decoder.next_event()
            while not isinstance(event, (Epilogue, NeedData)):
                if isinstance(event, Field) and event.name in FIELDS_AS_FILES:
                    part = File(name=event.name, filename="", headers=event.headers)
                    sink = self.start_file_streaming(part, content_length)
                elif isinstance(event, Field):
                    part, sink = event, []
                elif isinstance(event, File):
                    part, sink = event, self.start_file_streaming(event, content_length)
                elif isinstance(event, Data):
                    if isinstance(part, Field):
                        held += len(event.data)
                        if held > MAX_FORM_FIELDS_BYTES:
                            raise form_too_large()
                        sink.append(event.data)
                    else:
                        sink.write(event.data)
                    if not event.more_data:
                        if isinstance(part, Field):
                            fields.append((part.name, b"".join(sink).decode(self.get_part_charset(part.headers),
                                                                            "replace")))
                        else:
                            sink.seek(0)
                            files.append((part.name, FileStorage(sink, part.filename, part.name,
                                                                 headers=part.headers)))
                event = decoder.next_event()
            if not chunk:
                return self.cls(fields), self.cls(files)

