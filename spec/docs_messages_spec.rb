# frozen_string_literal: true

require "spec_helper"
require "tmpdir"

# docs/messages.md: the field reference of every built-in message, enum and service, written by
# `rake doc:messages` from proto/ (with the .proto files' comments).
RSpec.describe "the message reference (docs/messages.md)" do
  root = File.expand_path("..", __dir__)
  doc = File.join(root, "docs", "messages.md")

  it "is what `rake doc:messages` writes from proto/ now" do
    require_relative "../tasks/messages_doc"
    Dir.mktmpdir do |dir|
      Dir.chdir(root) { FlowctlMessagesDoc.write(File.join(dir, "messages.md")) }
      expect(File.read(File.join(dir, "messages.md"))).to eq(File.read(doc))
    end
  end

  it "has every field of every built-in message class with its number and JSON name" do
    text = File.read(doc)
    checked = 0
    [Flowctl::V1, Flowctl::ControlPlane, Flowctl::Processor, Flowctl::Common, Flowctl::Ext::V1].each do |mod|
      mod.constants.map { |c| mod.const_get(c) }.grep(Class).select { |k| k < Flowctl::Message }.each do |klass|
        expect(text).to include("### `#{klass.name}`")
        klass.fields.each do |name|
          f = klass.field_info(name)
          expect(text).to match(/\| `#{name}` \| #{f.number} \| `[^`]+` \| `#{f.json_name}` \|/)
          checked += 1
        end
      end
    end
    expect(checked).to be > 100
  end
end
