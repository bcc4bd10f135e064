# frozen_string_literal: true

module Flowctl
  # UNAVAILABLE: the server could not be reached or went away. A TLS handshake that failed
  # because the server answered in plaintext says so (tls: nil is TLS by default).
  class Unavailable
    PLAINTEXT_SIGNS = /wrong version number|WRONG_VERSION_NUMBER|packet length too long|http request/
    private_constant :PLAINTEXT_SIGNS

    def to_s
      msg = super
      return msg unless details.match?(PLAINTEXT_SIGNS)

      "#{msg} (the TLS handshake failed: the server may be plaintext; pass tls: false to call it without TLS)"
    end
  end
end
