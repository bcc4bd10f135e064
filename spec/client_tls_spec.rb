# frozen_string_literal: true

require "spec_helper"
require "openssl"

# TLS and mTLS through Flowctl::TLS against official grpc gem servers using the test PKI
# in spec/fixtures/tls (gen.sh); plaintext only when asked for; channel args pass through.
RSpec.describe "Flowctl clients: TLS, mTLS and channel args" do
  Official.load!
  cp = Obsrvr::Flow::Controlplane

  def pem(name) = OfficialServer.tls_file(name)

  def handler(name = "srv", seen = nil)
    cp = Obsrvr::Flow::Controlplane
    OfficialServer::Handler.new(
      register_processor: lambda { |req, call|
        seen << [call.peer_cert, req.processor_id] if seen
        cp::RegisterProcessorResponse.new(processor_id: req.processor_id, success: true, message: name)
      },
      register_source: ->(req, _call) { cp::RegisterSourceResponse.new(source_id: "x" * Integer(req.endpoint)) }
    )
  end

  def with_server(tls, **opts)
    server = OfficialServer.new
    port = server.start(handler_for_controlplane: handler(*opts.values_at(:name, :seen)), tls: tls)
    yield port
  ensure
    server&.stop
  end

  def client(port, host: "127.0.0.1", **opts)
    (@clients ||= []) << Flowctl::ControlPlane::Client.new("#{host}:#{port}", timeout: 5, **opts)
    @clients.last
  end

  after { @clients&.each(&:close) }

  it "talks TLS with the server's root certificate, by IP and by name" do
    with_server(:tls) do |port|
      tls = Flowctl::TLS.new(root_certs: pem("ca.pem"))
      expect(client(port, tls: tls).register_processor(processor_id: "a").success).to be(true)
      expect(client(port, host: "localhost", tls: tls).register_processor(processor_id: "b").success).to be(true)
    end
  end

  it "refuses a server whose certificate another CA signed" do
    with_server(:tls) do |port|
      c = client(port, tls: Flowctl::TLS.new(root_certs: pem("other-ca.pem")))
      expect { c.register_processor(processor_id: "a") }.to raise_error(Flowctl::Unavailable)
    end
  end

  it "uses TLS with the system roots by default (never plaintext unless asked)" do
    with_server(:tls) do |port|
      # the test CA is not a system root: the handshake must fail
      expect { client(port).register_processor }.to raise_error(Flowctl::Unavailable)
    end
    with_server(false) do |port|
      expect { client(port).register_processor }.to raise_error(Flowctl::Unavailable)
      expect { client(port, tls: true).register_processor }.to raise_error(Flowctl::Unavailable)
      expect(client(port, tls: false).register_processor(processor_id: "p").success).to be(true)
    end
  end

  it "does not fall back to plaintext against a TLS server" do
    with_server(:tls) do |port|
      expect { client(port, tls: false).register_processor }.to raise_error(Flowctl::Unavailable)
    end
  end

  it "presents the client certificate for mTLS, which the server requires" do
    seen = Queue.new
    with_server(:mtls, name: "mtls", seen: seen) do |port|
      mtls = Flowctl::TLS.new(root_certs: pem("ca.pem"), cert_chain: pem("client.pem"), private_key: pem("client.key"))
      expect(client(port, tls: mtls).register_processor(processor_id: "m").message).to eq("mtls")
      peer_cert, id = OfficialServer.pop(seen, 5)
      expect(id).to eq("m")
      expect(peer_cert).to include("BEGIN CERTIFICATE")
      expect(OpenSSL::X509::Certificate.new(peer_cert).subject.to_s).to include("flowctl test client")

      no_cert = client(port, tls: Flowctl::TLS.new(root_certs: pem("ca.pem")))
      expect { no_cert.register_processor }.to raise_error(Flowctl::Unavailable)
    end
  end

  it "checks TLS arguments" do
    expect { Flowctl::TLS.new(root_certs: 1) }.to raise_error(TypeError)
    expect { Flowctl::TLS.new(root_certs: "nope") }.to raise_error(ArgumentError, /PEM/)
    expect { Flowctl::TLS.new(cert_chain: pem("client.pem")) }.to raise_error(ArgumentError)
  end

  describe "channel args" do
    it "round-robins over several control-plane addresses" do
      s1 = OfficialServer.new
      s2 = OfficialServer.new
      p1 = s1.start(handler_for_controlplane: handler("one"), tls: false)
      p2 = s2.start(handler_for_controlplane: handler("two"), tls: false)
      c = Flowctl::ControlPlane::Client.new("ipv4:127.0.0.1:#{p1},127.0.0.1:#{p2}", tls: false,
                                            channel_args: {"grpc.lb_policy_name" => "round_robin"})
      (@clients ||= []) << c
      names = Array.new(20) { c.register_processor(processor_id: "r").message }
      expect(names.tally.keys).to contain_exactly("one", "two")
      expect(names.tally.values).to all(be >= 5)
    ensure
      s1&.stop
      s2&.stop
    end

    it "applies max message sizes (receive and send)" do
      with_server(false) do |port|
        small_in = client(port, tls: false, channel_args: {"grpc.max_receive_message_length" => 1000})
        expect(small_in.register_source(endpoint: "100").source_id.size).to eq(100)
        expect { small_in.register_source(endpoint: "5000") }.to raise_error(Flowctl::ResourceExhausted)

        small_out = client(port, tls: false, channel_args: {"grpc.max_send_message_length" => 100})
        expect { small_out.register_processor(processor_id: "y" * 500) }.to raise_error(Flowctl::ResourceExhausted)
        expect(small_out.register_processor(processor_id: "ok").success).to be(true)
      end
    end
  end
end
