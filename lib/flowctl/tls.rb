# frozen_string_literal: true

module Flowctl
  # TLS settings for clients and servers.
  #
  #   Flowctl::TLS.new(root_certs: File.read("ca.pem"))                       # server-authenticated TLS
  #   Flowctl::TLS.new(root_certs: ca, cert_chain: cert, private_key: key)    # mTLS (client side)
  #   Flowctl::TLS.new(cert_chain: cert, private_key: key, root_certs: ca,
  #                    client_auth: :require)                                 # server side
  class TLS
    attr_reader :root_certs, :cert_chain, :private_key, :client_auth

    CLIENT_AUTH = %i[none request require].freeze

    def initialize(root_certs: nil, cert_chain: nil, private_key: nil, client_auth: :none)
      @root_certs = pem(:root_certs, root_certs)
      @cert_chain = pem(:cert_chain, cert_chain)
      @private_key = pem(:private_key, private_key)
      raise ArgumentError, "cert_chain and private_key go together" if @cert_chain.nil? != @private_key.nil?
      raise ArgumentError, "client_auth must be one of #{CLIENT_AUTH.inspect}" unless CLIENT_AUTH.include?(client_auth)

      @client_auth = client_auth
      freeze
    end

    # [root_certs, private_key, cert_chain] as Flowctl::Native::Channel takes it.
    def to_native
      [root_certs, private_key, cert_chain]
    end

    def inspect
      "#<Flowctl::TLS root_certs: #{!root_certs.nil?}, client cert: #{!cert_chain.nil?}, client_auth: #{client_auth}>"
    end

    private

    def pem(name, value)
      return nil if value.nil?
      raise TypeError, "#{name} must be a PEM String (given #{value.class})" unless value.is_a?(String)
      raise ArgumentError, "#{name} does not look like PEM" unless value.include?("-----BEGIN")

      value.dup.freeze
    end
  end
end
