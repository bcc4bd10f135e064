# frozen_string_literal: true

require "spec_helper"

# TLS, mTLS and bearer-token auth on Flowctl::Server, checked with the official grpc client.
RSpec.describe "Flowctl::Server TLS and auth_token" do
  before(:all) { Official.load! }

  FIXTURES = File.expand_path("fixtures/tls", __dir__)
  def pem(name) = File.read(File.join(FIXTURES, name))

  let(:cp) { Obsrvr::Flow::Controlplane }
  let(:pr) { Obsrvr::Flow::Processor }
  let(:servers) { [] }
  let(:handled) { Queue.new }

  after { servers.each { |s| s.stop(grace: 0.5) } }

  let(:handler) do
    q = handled
    Class.new do
      define_method(:register_processor) do |req, _call|
        q << req.processor_id
        Flowctl::ControlPlane::RegisterProcessorResponse.new(processor_id: req.processor_id, success: true)
      end
    end.new
  end

  let(:echo) do
    q = handled
    Class.new do
      define_method(:process) do |requests, _call|
        q << :process
        requests.to_a
      end
    end.new
  end

  def serve(**opts)
    server = Flowctl::Server.new(port: 0, **opts)
    server.handle(Flowctl::ControlPlane::Service, handler)
    server.handle(Flowctl::Processor::Service, echo)
    servers << server
    server.start
    server
  end

  def stub(server, creds, klass = cp::ControlPlane::Stub)
    klass.new("127.0.0.1:#{server.port}", creds, timeout: 5,
                                                   channel_args: { "grpc.ssl_target_name_override" => "localhost" })
  end

  def register(stub, id = "p1", **opts)
    stub.register_processor(cp::RegisterProcessorRequest.new(processor_id: id), **opts)
  end

  let(:server_tls) { Flowctl::TLS.new(cert_chain: pem("server.pem"), private_key: pem("server.key")) }
  let(:mtls) do
    Flowctl::TLS.new(cert_chain: pem("server.pem"), private_key: pem("server.key"), root_certs: pem("ca.pem"),
                     client_auth: :require)
  end

  describe "TLS" do
    it "serves a client that trusts the CA" do
      server = serve(tls: server_tls)
      expect(register(stub(server, GRPC::Core::ChannelCredentials.new(pem("ca.pem")))).success).to be(true)
      expect(server.inspect).to include("tls: true")
    end

    it "fails the handshake for a client that trusts another CA, and for a plaintext client" do
      server = serve(tls: server_tls)
      expect { register(stub(server, GRPC::Core::ChannelCredentials.new(pem("other-ca.pem")))) }
        .to raise_error(GRPC::Unavailable)
      expect { register(stub(server, :this_channel_is_insecure)) }.to raise_error(GRPC::Unavailable)
      expect(handled).to be_empty
    end

    it "needs a certificate and key" do
      expect { Flowctl::Server.new(tls: Flowctl::TLS.new(root_certs: pem("ca.pem"))) }
        .to raise_error(ArgumentError, /cert_chain/)
    end
  end

  describe "mTLS (client_auth: :require)" do
    it "serves a client with a certificate signed by the CA" do
      server = serve(tls: mtls)
      creds = GRPC::Core::ChannelCredentials.new(pem("ca.pem"), pem("client.key"), pem("client.pem"))
      expect(register(stub(server, creds)).success).to be(true)
    end

    it "refuses a client without a certificate" do
      server = serve(tls: mtls)
      expect { register(stub(server, GRPC::Core::ChannelCredentials.new(pem("ca.pem")))) }
        .to raise_error(GRPC::Unavailable)
      expect(handled).to be_empty
    end
  end

  describe "auth_token" do
    it "serves calls with the right bearer token" do
      server = serve(tls: false, auth_token: "s3cret")
      s = stub(server, :this_channel_is_insecure)
      expect(register(s, metadata: { "authorization" => "Bearer s3cret" }).success).to be(true)
      expect(handled.pop).to eq("p1")
    end

    it "rejects calls without it or with another one with UNAUTHENTICATED before any handler runs" do
      server = serve(tls: false, auth_token: "s3cret")
      s = stub(server, :this_channel_is_insecure)
      [{}, { "authorization" => "Bearer wrong" }, { "authorization" => "s3cret" },
       { "authorization" => "Bearer s3cret2" }, { "x-token" => "Bearer s3cret" }].each do |md|
        expect { register(s, metadata: md) }.to raise_error(GRPC::Unauthenticated, /bearer token/)
      end
      expect { stub(server, :this_channel_is_insecure, pr::ProcessorService::Stub).process([pr::DataMessage.new]).to_a }
        .to raise_error(GRPC::Unauthenticated)
      expect(handled).to be_empty
    end

    it "guards bidi streams too" do
      server = serve(tls: false, auth_token: "s3cret")
      s = stub(server, :this_channel_is_insecure, pr::ProcessorService::Stub)
      out = s.process([pr::DataMessage.new(payload: "x")], metadata: { "authorization" => "Bearer s3cret" }).to_a
      expect(out.map(&:payload)).to eq(["x"])
    end

    it "works with mTLS at the same time" do
      server = serve(tls: mtls, auth_token: "t")
      creds = GRPC::Core::ChannelCredentials.new(pem("ca.pem"), pem("client.key"), pem("client.pem"))
      expect { register(stub(server, creds)) }.to raise_error(GRPC::Unauthenticated)
      expect(register(stub(server, creds), metadata: { "authorization" => "Bearer t" }).success).to be(true)
    end
  end
end
