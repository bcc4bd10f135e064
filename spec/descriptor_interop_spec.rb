# frozen_string_literal: true

require "spec_helper"
require "tmpdir"
require "grpc"

# A protocol the gem has never seen (spec/fixtures/acme), loaded at run time from a
# descriptor set, called and served in all four shapes against the official grpc gem
# (whose classes protoc generated from the same files).
RSpec.describe "a run-time loaded service against the official grpc gem" do
  fixtures = File.expand_path("fixtures", __dir__)
  root = (FlowctlSpecInterop = Module.new)
  set = File.join(Dir.mktmpdir("flowctl-acme"), "acme.pb")
  gen = Dir.mktmpdir("flowctl-acme-gen")
  files = %w[acme/orders.proto acme/common.proto].map { |f| File.join(fixtures, f) }
  system("protoc", "-I#{fixtures}", "-I/usr/include", "--include_imports", "--descriptor_set_out=#{set}", files[0]) or
    raise "protoc failed"
  system("grpc_tools_ruby_protoc", "-I#{fixtures}", "-I/usr/include", "--ruby_out=#{gen}", "--grpc_out=#{gen}", *files) or
    raise "grpc_tools_ruby_protoc failed"
  $LOAD_PATH.unshift(gen)
  require "acme/orders_services_pb"
  ACME_INTEROP_TYPES = Flowctl.load_descriptor_set(File.binread(set), root: root)
  AcmeOrderF = ACME_INTEROP_TYPES.fetch("acme.orders.v1.Order")
  AcmeRequestF = ACME_INTEROP_TYPES.fetch("acme.orders.v1.OrderRequest")
  AcmeOrdersF = ACME_INTEROP_TYPES.fetch("acme.orders.v1.Orders")
  AcmeOrdersClient = Class.new(Flowctl::Client) { use_service AcmeOrdersF }

  # The same behaviour on either side: get echoes the id into an order; watch sends three
  # orders; upload answers with the ids joined; sync answers each order with its lines doubled.
  class AcmeFlowctlOrders
    def get(req, _call) = AcmeOrderF.new(id: req.id, state: :STATE_PAID, labels: { "from" => "flowctl" })
    def watch(req, _call) = 3.times { |i| yield AcmeOrderF.new(id: "#{req.id}-#{i}", priority: :PRIORITY_HIGH) }
    def upload(orders, _call) = AcmeRequestF.new(id: orders.map(&:id).join(","))
    def sync(orders, call) = orders.each { |o| call.write(AcmeOrderF.new(id: o.id, lines: o.lines + o.lines)) }
  end

  class AcmeOfficialOrders < Acme::Orders::V1::Orders::Service
    O = Acme::Orders::V1::Order
    def get(req, _call) = O.new(id: req.id, state: :STATE_PAID, labels: { "from" => "official" })
    def watch(req, _call) = Array.new(3) { |i| O.new(id: "#{req.id}-#{i}", priority: :PRIORITY_HIGH) }.each
    def upload(call) = Acme::Orders::V1::OrderRequest.new(id: call.each_remote_read.map(&:id).join(","))
    def sync(orders) = orders.lazy.map { |o| O.new(id: o.id, lines: o.lines.to_a * 2) }
  end

  def order(id) = AcmeOrderF.new(id: id, lines: [{ sku: id, quantity: 1 }], invoice_number: 0, discount_cents: 0)

  shared_examples "all four shapes" do
    it "calls unary, server streaming, client streaming and bidi" do
      c = AcmeOrdersClient.new("127.0.0.1:#{port}", tls: false, timeout: time_limit(5))
      got = c.get(id: "o1")
      expect([got.id, got.state]).to eq(["o1", :STATE_PAID])
      expect(c.watch(id: "w").map { |o| [o.id, o.priority] })
        .to eq([["w-0", :PRIORITY_HIGH], ["w-1", :PRIORITY_HIGH], ["w-2", :PRIORITY_HIGH]])
      expect(c.upload([order("a"), order("b")]).id).to eq("a,b")
      replies = c.sync([order("x"), order("y")], timeout: time_limit(5)).to_a
      expect(replies.map { |o| [o.id, o.lines.map(&:sku)] }).to eq([["x", %w[x x]], ["y", %w[y y]]])
    ensure
      c&.close
    end
  end

  context "this gem's client, the official gem's server" do
    before(:all) do
      @server = GRPC::RpcServer.new
      @port = @server.add_http2_port("127.0.0.1:0", :this_port_is_insecure)
      @server.handle(AcmeOfficialOrders)
      @thread = Thread.new { @server.run }
      @server.wait_till_running(5)
    end
    after(:all) do
      @server.stop
      @thread.join
    end
    let(:port) { @port }

    include_examples "all four shapes"
  end

  context "the official gem's client, this gem's server" do
    let(:server) { Flowctl::Server.new.handle(AcmeOrdersF, AcmeFlowctlOrders.new) }
    let(:port) { server.port }
    before { server.start }
    after { server.stop(grace: 0) }

    include_examples "all four shapes"

    it "serves all four shapes to the official stub" do
      stub = Acme::Orders::V1::Orders::Stub.new("127.0.0.1:#{port}", :this_channel_is_insecure)
      o = Acme::Orders::V1::Order
      expect(stub.get(Acme::Orders::V1::OrderRequest.new(id: "g")).labels.to_h).to eq("from" => "flowctl")
      expect(stub.watch(Acme::Orders::V1::OrderRequest.new(id: "w")).map(&:id)).to eq(%w[w-0 w-1 w-2])
      expect(stub.upload([o.new(id: "a"), o.new(id: "b", invoice_number: 0)]).id).to eq("a,b")
      replies = stub.sync([o.new(id: "s", lines: [{ sku: "k" }])]).to_a
      expect(replies.map { |r| r.lines.map(&:sku) }).to eq([%w[k k]])
    end
  end
end
